"""Moved to :mod:`misp.testing.tiny_llava` (the tiny random-weight models live in misp.testing); this name stays
an alias of that very module, so existing imports and monkeypatches keep working."""

import sys

from misp.testing import tiny_llava as _moved

sys.modules[__name__] = _moved
