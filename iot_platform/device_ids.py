"""What a device id is: the one definition the PKI (a certificate's CN, so the broker's
username), the decoder (a payload's ``device_id``) and the warehouse (the ``devices`` CHECK
constraint of migration 1, which a test keeps equal to this) share.

Letters, digits, ``_`` and ``-``; starts with a letter or digit; at most 64 characters — it
is also an MQTT topic level and a file name (``certs/devices/<id>.crt``), so no ``/``, ``+``,
``#`` or ``.``. Ids are unique regardless of case (migration 3).
"""

from __future__ import annotations

import re

DEVICE_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
DEVICE_ID_PATTERN = re.compile(DEVICE_ID_REGEX)
