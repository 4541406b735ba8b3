-- Latest value of every metric per device, with the device's last status event.
-- The last status is the one received last (received_at), not the one with the newest
-- device ts: a last-will message carries the time the device connected.
-- The daily rollup finds each (device, metric)'s latest day cheaply; the exact latest
-- row is then one index lookup in telemetry (unique index on device_id, metric, ts).
-- If telemetry rows were already dropped (retention) the rollup's last value is used
-- and last_ts is null.
with latest_day as (
    select distinct on (device_id, metric)
        device_id, metric, bucket, last
    from {{ source('warehouse', 'telemetry_1d') }}
    order by device_id, metric, bucket desc
),

latest as (
    select
        l.device_id,
        l.metric,
        t.ts as last_ts,
        coalesce(t.value, l.last) as last_value,
        t.unit
    from latest_day as l
    left join lateral (
        select r.ts, r.value, r.unit
        from {{ source('warehouse', 'telemetry') }} as r
        where r.device_id = l.device_id
          and r.metric = l.metric
          and r.ts >= l.bucket
        order by r.ts desc
        limit 1
    ) as t on true
),

last_status as (
    select distinct on (device_id)
        device_id, received_at as status_at, body ->> 'status' as status
    from {{ source('warehouse', 'device_events') }}
    where msg_type = 'status'
    order by device_id, received_at desc, ts desc
)

select
    l.device_id,
    d.device_type,
    l.metric,
    l.last_ts,
    l.last_value,
    l.unit,
    d.last_seen,
    s.status as last_status,
    s.status_at as last_status_at
from latest as l
left join {{ source('warehouse', 'devices') }} as d on d.device_id = l.device_id
left join last_status as s on s.device_id = l.device_id
