-- Fails on purpose when JAFFLE_FAIL_ORDER_TOTALS=1 is in the step environment: Runslot's
-- rerun-from-failure test (`dbt retry` must rebuild this model and what it skipped).
with orders as (
    select * from {{ ref('stg_orders') }}
)
select status, count(*) as number_of_orders
{%- if env_var('JAFFLE_FAIL_ORDER_TOTALS', '0') == '1' %}
    , error('order_totals fails on purpose (JAFFLE_FAIL_ORDER_TOTALS=1)') as failed
{%- endif %}
from orders
group by status
