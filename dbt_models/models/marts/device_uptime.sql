-- Availability per device and UTC day: the share of the day's 24 hours in which the
-- device sent any telemetry (an hour counts once telemetry_1h has a bucket for it).
-- Days run from the first to the last day with data; a registered device gets a row for
-- every such day from its enrolment on, with 0 hours when it sent nothing. Today's row
-- is a partial day (is_complete_day = false).
with hourly as (
    select
        (bucket at time zone 'UTC')::date as day,
        device_id,
        count(distinct bucket) as hours_with_data,
        count(distinct metric) as metrics_reported,
        sum(count) as samples,
        min(bucket) as first_hour,
        max(bucket) as last_hour
    from {{ source('warehouse', 'telemetry_1h') }}
    group by 1, 2
),

bounds as (
    select min(day) as first_day, max(day) as last_day from hourly
),

days as (
    select generate_series(first_day, last_day, interval '1 day')::date as day
    from bounds
    where first_day is not null
),

device_days as (
    select days.day, d.device_id
    from days
    cross join {{ source('warehouse', 'devices') }} as d
    where days.day >= (d.enrolled_at at time zone 'UTC')::date
    union
    select day, device_id from hourly
)

select
    dd.day,
    dd.device_id,
    coalesce(h.hours_with_data, 0) as hours_with_data,
    24 as hours_in_day,
    round(coalesce(h.hours_with_data, 0) / 24.0, 4)::double precision as availability,
    coalesce(h.metrics_reported, 0) as metrics_reported,
    coalesce(h.samples, 0) as samples,
    h.first_hour,
    h.last_hour,
    dd.day < (now() at time zone 'UTC')::date as is_complete_day
from device_days as dd
left join hourly as h on h.day = dd.day and h.device_id = dd.device_id
