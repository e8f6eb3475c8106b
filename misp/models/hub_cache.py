"""Moved to :mod:`misp.testing.hub_cache` (the tiny random-weight models live in misp.testing); this name stays
an alias of that very module, so existing imports and monkeypatches keep working."""

import sys

from misp.testing import hub_cache as _moved

sys.modules[__name__] = _moved
