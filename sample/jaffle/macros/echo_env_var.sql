{# Prints an env var: Runslot's tests check that secret values never reach stored logs. #}
{% macro echo_env_var(name) %}
  {{ log(name ~ " is " ~ env_var(name, "unset"), info=True) }}
{% endmacro %}
