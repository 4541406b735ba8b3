"""The MQTT topic families (DESIGN §4): the one definition that the broker ACL, the ingest
subscriptions and the decoder's routing are all derived from.

A device may publish exactly the topics the platform consumes: the ACL grants a device
(its certificate CN, ``%u``) write access to each device-published family with its own id
in the device level and nothing else, so the broker refuses ``iot/<id>/telemetry/extra``,
``iot/<id>/Telemetry`` or ``devices/<id>/temp/extra`` with a reason code the device sees
(MQTT v5 PUBACK "not authorised") instead of accepting a message nobody subscribed to.
Everything the ACL lets through matches an ingest subscription, reaches the raw batch and
is decoded or rejected with a reason.

Levels: the root (first level), the device id (second level, always), then the tail,
where ``+`` is any one non-empty level (a metric, a mode, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

ANY = "+"
# Every family puts the device id at this level (0-based): ``root/{device_id}/...``.
DEVICE_LEVEL = 1


@dataclass(frozen=True)
class TopicFamily:
    decoder: str  # the decoder's family: "v2" | "scalar" | "param"
    root: str
    tail: tuple[str, ...]
    kind: str | None = None  # v2: the message kind the tail means
    device_publishes: bool = True  # False: sent to devices (commands), recorded by ingest

    def subscription(self) -> str:
        """The ingest daemon's topic filter for this family (any device)."""
        return "/".join((self.root, ANY, *self.tail))

    def acl_write(self) -> str:
        """The ACL pattern that lets a device publish this family under its own id only."""
        return "/".join((self.root, "%u", *self.tail))


FAMILIES: tuple[TopicFamily, ...] = (
    TopicFamily("v2", "iot", ("telemetry",), kind="telemetry"),
    TopicFamily("v2", "iot", ("hello",), kind="hello"),
    TopicFamily("v2", "iot", ("status",), kind="status"),  # also the last will (retained)
    TopicFamily("v2", "iot", ("command", "ack"), kind="command_ack"),
    TopicFamily("v2", "iot", ("ota", "status"), kind="ota_status"),
    TopicFamily("scalar", "devices", (ANY,)),  # devices/{id}/{metric}
    TopicFamily("param", "tele", (ANY, ANY, ANY)),  # {root}/{id}/{mode}/{connector}/{component}
    TopicFamily("param", "stat", (ANY, ANY, ANY)),
    TopicFamily("param", "cmnd", (ANY, ANY, ANY), device_publishes=False),
)

# Downstream (platform -> device) topics a device may subscribe to. Not consumed here.
DEVICE_READS: tuple[str, ...] = ("iot/%u/command/#", "iot/%u/ota/#", "cmnd/%u/#")


def ingest_subscriptions() -> tuple[str, ...]:
    """The topic filters the ingest daemon subscribes to (INGEST_TOPICS' default)."""
    return tuple(family.subscription() for family in FAMILIES)


def device_acl_rules() -> str:
    """The ACL lines every device gets (``pattern`` lines, ``%u`` = certificate CN)."""
    writes = [f"pattern write {f.acl_write()}" for f in FAMILIES if f.device_publishes]
    reads = [f"pattern read {topic}" for topic in DEVICE_READS]
    return "\n".join([*writes, *reads])


def v2_kinds() -> dict[str, str]:
    """The v2 topic tails (``command/ack``) and the message kind each carries."""
    return {"/".join(f.tail): f.kind for f in FAMILIES if f.decoder == "v2" and f.kind}


def routing_pattern(decoder: str) -> str:
    """The regex that routes a topic to ``decoder``'s family. Group 1 is the device id
    (possibly empty or malformed: the decoder rejects it with a reason); then one group
    per ``+`` level, or, when the tails are fixed words (v2), one group with the tail."""
    families = [f for f in FAMILIES if f.decoder == decoder]
    roots = "|".join(sorted({f.root for f in families}))
    tails = {f.tail for f in families}
    if all(ANY not in tail for tail in tails):
        tail = "(" + "|".join("/".join(t) for t in sorted(tails)) + ")"
    else:
        (shape,) = tails  # one shape of + levels per decoder family
        tail = "/".join("([^/]+)" if level == ANY else level for level in shape)
    return f"^(?:{roots})/([^/]*)/{tail}$"
