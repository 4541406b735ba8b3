-- One row per UTC day, device and metric, straight from the daily rollup (no scan of
-- telemetry). telemetry_1d buckets start at UTC midnight on both dialects.
select
    (t.bucket at time zone 'UTC')::date as day,
    t.device_id,
    d.device_type,
    t.metric,
    t.count as samples,
    t.sum as sum_value,
    t.avg as avg_value,
    t.min as min_value,
    t.max as max_value,
    t.first as first_value,
    t.last as last_value
from {{ source('warehouse', 'telemetry_1d') }} as t
left join {{ source('warehouse', 'devices') }} as d on d.device_id = t.device_id
