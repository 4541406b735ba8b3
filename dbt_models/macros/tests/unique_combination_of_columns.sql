{#
  The model's grain: no two rows share the same values in combination_of_columns.
  A small stand-in for dbt_utils.unique_combination_of_columns (no packages here).
#}
{% test unique_combination_of_columns(model, combination_of_columns) %}
select {{ combination_of_columns | join(', ') }}, count(*) as duplicate_rows
from {{ model }}
group by {{ combination_of_columns | join(', ') }}
having count(*) > 1
{% endtest %}
