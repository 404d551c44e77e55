"""The dbt Cloud-compatible REST API (`runslot api`, `python -m api`).

The surface of ``shared/reference/dbt-cloud-api.md`` §2, every route with and without its
trailing slash (never redirected), every answer in dbt Cloud's envelope:

==========================================================================  ===============
route                                                                       module
==========================================================================  ===============
``GET /``                                                                   routes_accounts
``GET /api/v2/accounts/``, ``GET /api/v2|v3/accounts/{a}/``                 routes_accounts
``GET|POST /api/v2/accounts/{a}/jobs/``                                     routes_jobs
``GET|POST|DELETE /api/v2/accounts/{a}/jobs/{j}/``                          routes_jobs
``POST /api/v2/accounts/{a}/jobs/{j}/run/``, ``…/rerun/``                   routes_jobs
``GET /api/v2/accounts/{a}/runs/``, ``…/runs/{r}/``                         routes_runs
``POST /api/v2/accounts/{a}/runs/{r}/cancel/``                              routes_runs
``GET /api/v2/accounts/{a}/runs/{r}/artifacts/[{path}]``                    routes_runs
``GET /api/v3/accounts/{a}/projects/[{p}/]``                                routes_accounts
``GET|POST /api/v3/accounts/{a}/projects/{p}/environments/``                routes_accounts
``GET /api/v3/accounts/{a}/projects/{p}/environments/{e}/``                 routes_accounts
``GET /api/v3/accounts/{a}/environments/``                                  routes_accounts
``GET /api/v3/accounts/{a}/projects/{p}/environment-variables/job/``        routes_accounts
==========================================================================  ===============

Runslot's extensions to dbt Cloud's bodies:

* ``"runslot_key": "<identifier>"`` in a job create body keys the job by that identifier
  (not digits only): creating it again updates the same job (``runslot jobs apply``). Job
  objects of such jobs carry ``runslot_key``.
* ``"schedule": {"cron": …, "timezone": "Europe/Paris"}``: the zone the cron is read in
  (dbt Cloud's crons are UTC, the default).
* ``POST …/projects/{p}/environments/`` with ``{"name": …, "runslot": {<Environment>}}``
  creates or replaces the environment of that name; the jobs using it are saved again.
  Secret references (``{{ secret('X') }}``) are kept as written; a literal value under a
  secret-looking name (password, token, key …) is shown as ``********``.
* ``run_steps[].logs`` is the last 1 MiB of each step's log (64 KiB in run listings), with a
  first line saying how much was cut; ``truncated_debug_logs`` its last 1,000 lines.

Tokens: ``runslot tokens create ACCOUNT`` (after ``runslot accounts create ACCOUNT``).
"""
