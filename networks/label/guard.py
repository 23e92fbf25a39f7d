"""Request checks for the MONAI Label app: a bad request is answered 4xx with the reason, and a failed
request leaves no uploaded file behind.

MONAI Label (0.8.5) answers 500 to an unknown model or a missing image id, and its ``/infer`` endpoint
removes an uploaded image only after a successful answer (a FastAPI background task), so a failed request
leaves the upload in the temporary folder. :func:`guard_app` wraps the app's ``infer`` (``prepare_app``
appends the call to the app's ``main.py``):

* no ``model`` -> 400; a model the app does not serve -> 404 naming the served ones;
* an image that is neither a file nor an id of the datastore -> 404 naming it;
* an input that fails the bundle's input check (``networks.bundle.validation.CaseError``, raised by the
  ``ValidateCased`` step of the bundle's preprocessing) -> 422 with the file, the check and the reason;
* on any failure, the request's uploaded image / label (files MONAI Label wrote to the temporary folder)
  are removed before the error is passed on.

Only the guarded app needs fastapi (MONAI Label's environment); this module imports it lazily.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

__all__ = ["RequestError", "http_error", "check_request", "guarded_infer", "guard_app", "GUARD_LINES"]

logger = logging.getLogger(__name__)

# appended to the app's main.py by networks.label.prepare_app
GUARD_LINES = ("\n# networks.label: 4xx answers for bad requests, no upload left behind (networks/label/guard.py)\n"
               "from networks.label.guard import guard_app as _guard_app\n_guard_app(globals())\n")


class RequestError(Exception):
    """An HTTP error without fastapi (unit tests): ``status_code`` and ``detail`` as fastapi's HTTPException."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code, self.detail = status_code, detail


def http_error(status: int, detail: str) -> Exception:
    """fastapi's ``HTTPException(status, detail)`` (FastAPI answers it as such), or :class:`RequestError`."""
    try:
        from fastapi import HTTPException
    except ImportError:
        return RequestError(status, detail)
    return HTTPException(status_code=status, detail=detail)


def check_request(request: Mapping[str, Any], models: Iterable[str], image_exists: Callable[[str], bool]) -> None:
    """Raise a 4xx :func:`http_error` when ``request`` names no / an unknown model or an image that does not exist.

    Args:
        request: MONAI Label's infer request (``model``, ``image``: a path or a datastore id).
        models: the models the app serves.
        image_exists: tells whether a datastore id exists.
    """
    models = sorted(models)
    model = request.get("model")
    if not model:
        raise http_error(400, f"no model given; this server serves: {', '.join(models) or 'none'}")
    if model not in models:
        raise http_error(404, f"unknown model {model!r}; this server serves: {', '.join(models) or 'none'}")
    image = request.get("image")
    if isinstance(image, str) and not os.path.exists(image) and not image_exists(image):
        raise http_error(404, f"no image {image!r}: neither a file nor an image id of the datastore")


def _is_upload(path: Any) -> bool:
    """A file that MONAI Label's /infer wrote from an upload (``tempfile.NamedTemporaryFile().name``)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return False
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return folder == os.path.realpath(tempfile.gettempdir()) and os.path.basename(path).startswith("tmp")


def _case_error(e: BaseException) -> Optional[BaseException]:
    from networks.bundle.validation import CaseError

    seen: List[BaseException] = []
    while e is not None and e not in seen:
        if isinstance(e, CaseError):
            return e
        seen.append(e)
        e = e.__cause__ or e.__context__
    return None


def guarded_infer(infer: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``MONAILabelApp.infer(self, request, datastore=None)`` with the checks of the module docstring."""
    if getattr(infer, "_networks_guarded", False):
        return infer

    @functools.wraps(infer)
    def wrapper(self: Any, request: Dict[str, Any], datastore: Any = None) -> Any:
        uploads = [p for p in (request.get("image"), request.get("label")) if _is_upload(p)]
        try:
            store = datastore if datastore is not None else self.datastore()
            check_request(request, (getattr(self, "_infers", None) or {}).keys(),
                          lambda i: bool(store.get_image_uri(i)))
            try:
                return infer(self, request, datastore)
            except Exception as e:
                case = _case_error(e)
                if case is not None:
                    raise http_error(422, str(case)) from e
                raise
        except BaseException:
            for p in uploads:
                try:
                    os.remove(p)
                    logger.info("removed the upload %s of a failed request", p)
                except OSError:
                    pass
            raise

    wrapper._networks_guarded = True  # type: ignore[attr-defined]
    return wrapper


def guard_app(namespace: Mapping[str, Any]) -> List[str]:
    """Wrap ``infer`` of every MONAI Label app class in ``namespace`` (a ``main.py``'s ``globals()``: the
    classes with ``MONAILabelApp`` among their direct bases, as MONAI Label finds them); returns their names."""
    done = []
    for name, obj in list(namespace.items()):
        if isinstance(obj, type) and "MONAILabelApp" in [b.__name__ for b in obj.__bases__]:
            obj.infer = guarded_infer(obj.infer)
            done.append(name)
    return done
