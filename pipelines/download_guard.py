"""img2dataset's Downloader with reco's guarded fetch (:mod:`reco.pipelines.safe_http`).

img2dataset fetches with ``urllib.request.urlopen``: any scheme urllib knows, redirects to any
host, environment proxies. :class:`GuardedDownloader` runs img2dataset's own ``download_shard``
(same writer, resizer, statuses and stats) with ``download_image_with_retry`` bound to a
:class:`~reco.pipelines.safe_http.NetPolicy`: the function is rebuilt from img2dataset's code
with a private globals dict, so nothing in img2dataset (or urllib) is patched process-wide and
two downloaders with different policies can run side by side. The class is importable by name,
so instances pickle to spawned img2dataset-style worker processes.
"""
from __future__ import annotations

import functools
import types

import img2dataset.downloader as _i2d
from img2dataset.downloader import Downloader

from reco.pipelines.safe_http import NetPolicy, download_image_with_retry

# img2dataset 1.47 names these module globals in Downloader.download_shard; fail loudly if not.
_HOOK = "download_image_with_retry"


def _names(code: types.CodeType) -> set[str]:
    """Global names used by ``code`` and the functions/lambdas nested in it."""
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _names(const)
    return found


if _HOOK not in _names(Downloader.download_shard.__code__):
    raise ImportError(f"img2dataset's Downloader.download_shard no longer calls {_HOOK}; "
                      f"reco.pipelines.download_guard needs updating")


@functools.lru_cache(maxsize=16)
def _download_shard(policy: NetPolicy):
    namespace = dict(vars(_i2d))
    namespace[_HOOK] = functools.partial(download_image_with_retry, policy=policy)
    code = Downloader.download_shard
    return types.FunctionType(code.__code__, namespace, code.__name__, code.__defaults__,
                              code.__closure__)


class GuardedDownloader(Downloader):
    """``Downloader(**img2dataset_kwargs)`` whose every request obeys ``policy``."""

    def __init__(self, policy: NetPolicy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def download_shard(self, row):
        return _download_shard(self.policy)(self, row)
