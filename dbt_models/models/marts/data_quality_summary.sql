-- Data quality per UTC day and device: what the decoder rejected (decode_rejects, the
-- device id taken from the topic iot/{device_id}/...), what it accepted
-- (device_messages) and how the device-health rules judged the device (device_health).
-- Rejects may come from unregistered devices (is_registered = false); health rows are
-- only ever written for registered devices.
with rejects as (
    select
        (received_at at time zone 'UTC')::date as day,
        coalesce(nullif(split_part(topic, '/', 2), ''), '(unknown)') as device_id,
        count(*) as rejected_messages,
        string_agg(distinct reason, ', ' order by reason) as reject_reasons
    from {{ source('warehouse', 'decode_rejects') }}
    group by 1, 2
),

accepted as (
    select
        (received_at at time zone 'UTC')::date as day,
        device_id,
        count(*) as accepted_messages
    from {{ source('warehouse', 'device_messages') }}
    group by 1, 2
),

health as (
    select
        (checked_at at time zone 'UTC')::date as day,
        device_id,
        count(*) as health_evaluations,
        count(*) filter (where status = 'ok') as health_ok,
        count(*) filter (where status = 'warn') as health_warn,
        count(*) filter (where status = 'error') as health_error,
        string_agg(distinct check_name, ', ' order by check_name)
            filter (where status <> 'ok') as failed_checks
    from {{ source('warehouse', 'device_health') }}
    group by 1, 2
),

keys as (
    select day, device_id from rejects
    union
    select day, device_id from accepted
    union
    select day, device_id from health
)

select
    k.day,
    k.device_id,
    d.device_id is not null as is_registered,
    coalesce(a.accepted_messages, 0) as accepted_messages,
    coalesce(r.rejected_messages, 0) as rejected_messages,
    (coalesce(r.rejected_messages, 0)::double precision
        / nullif(coalesce(r.rejected_messages, 0) + coalesce(a.accepted_messages, 0), 0))
        as reject_rate,
    r.reject_reasons,
    coalesce(h.health_evaluations, 0) as health_evaluations,
    coalesce(h.health_ok, 0) as health_ok,
    coalesce(h.health_warn, 0) as health_warn,
    coalesce(h.health_error, 0) as health_error,
    h.failed_checks,
    case
        when h.health_error > 0 then 'error'
        when h.health_warn > 0 then 'warn'
        when h.health_ok > 0 then 'ok'
    end as worst_health_status
from keys as k
left join rejects as r on r.day = k.day and r.device_id = k.device_id
left join accepted as a on a.day = k.day and a.device_id = k.device_id
left join health as h on h.day = k.day and h.device_id = k.device_id
left join {{ source('warehouse', 'devices') }} as d on d.device_id = k.device_id
