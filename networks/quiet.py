"""Silence the two known-harmless notices that every bundle run printed, by their exact message, nothing else.

* MONAI's ``UserWarning`` "parsing config_file ...: any `"_target_"` value in it is resolved ... `eval()`"
  (a security notice printed for every config file, including this project's own bundles);
* "nvImageCodec is not available; skipping pydicom decoder plugin registration." (a log record of
  ``monai.data.nvimgcodec_pydicom_plugin``) and the ``NvImgCodecPydicomReader`` ``UserWarning`` that follows
  it: MONAI's optional GPU DICOM decoder is missing, pydicom's own decoders are used (printed even for
  NIfTI input, whenever a ``LoadImage`` is built).

:func:`filter_known_warnings` runs when ``networks`` is imported, i.e. when a bundle config evaluates
``$import networks``. MONAI's ``python -m monai.bundle run`` prints its config notice before any config is
read; to silence that one too, set ``PYTHONWARNINGS="ignore:parsing config_file"`` (README, "Quiet runs").
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["filter_known_warnings", "KNOWN_WARNINGS", "KNOWN_LOG_MESSAGES"]

# (message regex matched at the start, category) for warnings.filterwarnings
KNOWN_WARNINGS = (
    (r"parsing config_file .*`eval\(\)`", UserWarning),
    (r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", UserWarning),
)
# logger name -> message prefixes dropped from it
KNOWN_LOG_MESSAGES = {
    "monai.data.nvimgcodec_pydicom_plugin": ("nvImageCodec is not available",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def filter_known_warnings() -> None:
    """Install the filters (idempotent)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in KNOWN_LOG_MESSAGES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(prefixes))
