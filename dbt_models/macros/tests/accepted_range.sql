{#
  Rows whose column lies outside [min_value, max_value] (either bound optional; SQL
  expressions allowed, e.g. "now() + interval '1 day'"). inclusive=false excludes the
  bounds themselves. NULLs are not checked (use not_null for that).
  A small stand-in for dbt_utils.accepted_range: this project installs no packages.
#}
{% test accepted_range(model, column_name, min_value=none, max_value=none, inclusive=true) %}
select *
from {{ model }}
where {{ column_name }} is not null
  and (
    false
    {%- if min_value is not none %}
    or {{ column_name }} {{ '<' if inclusive else '<=' }} {{ min_value }}
    {%- endif %}
    {%- if max_value is not none %}
    or {{ column_name }} {{ '>' if inclusive else '>=' }} {{ max_value }}
    {%- endif %}
  )
{% endtest %}
