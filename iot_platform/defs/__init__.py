"""The platform code location's definitions, one package per domain, autoloaded.

``iot_platform.definitions`` loads everything under this folder with
``dg.load_from_defs_folder`` (the ``[tool.dg]`` project in pyproject.toml): a new asset,
job, schedule, sensor or check in any module here is part of the location without a
hand-written list. Shared facts live at this level: asset keys (``keys``), the hourly
partitions (``partitions``) and the resources (``resources``).
"""
