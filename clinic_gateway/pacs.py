"""Sending one DICOM file to the clinic's PACS: DICOMweb STOW-RS or DIMSE C-STORE (``[pacs]``).

A send ends in one of three ways, and the forwarder (clinic_gateway/forwarder.py) acts on it:

- it returns: the PACS holds the instance (also when it held it already: a PACS keys an
  instance by its SOP Instance UID, so sending twice never makes two);
- :class:`RetryLater`: nothing about this instance is wrong, the PACS or the way to it is
  (down, timed out, busy, out of resources, or our credentials or URL refused, which waits
  for clinic IT rather than condemning every capture in the queue): try again later;
- :class:`Rejected`: the PACS refused this instance for good (HTTP 4xx other than those, a
  DICOM failure status, a SOP class it does not take) or the file is not DICOM: retrying
  cannot help, a person must look (the entry goes to ``forward/failed/``).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any, Protocol

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from clinic_gateway.config import PacsConfig

#: HTTP statuses that say "later" (timeout, too many requests) or "not you, us": a wrong
#: password or URL is clinic IT's to fix, and the captures wait for it in the queue.
HTTP_RETRY = frozenset({401, 403, 404, 405, 407, 408, 425, 429})
#: C-STORE statuses that are a success (0x0000) or a warning the instance survives: coerced
#: (0xB000), elements discarded (0xB006), dataset does not match the SOP class (0xB007).
CSTORE_STORED = frozenset({0x0000, 0x0001, 0xB000, 0xB006, 0xB007})
#: 0xA7xx: "refused: out of resources"; retried.
_CSTORE_BUSY = range(0xA700, 0xA800)


class PacsError(Exception):
    """A send that did not store the instance; ``reason`` is a short stable word for logs
    and metrics (``unreachable``, ``http_400``, ``status_0xc000``...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RetryLater(PacsError):
    pass


class Rejected(PacsError):
    pass


class Sender(Protocol):
    transport: str

    def send(self, path: Path, sop_instance_uid: str) -> None:
        """Store the DICOM file at ``path`` in the PACS, or raise RetryLater / Rejected."""

    def probe(self) -> str:
        """Reach the PACS without storing anything; what answered, or RetryLater."""

    def close(self) -> None: ...


def read_dicom(path: Path, sop_instance_uid: str) -> Dataset:
    """The stored DICOM file; Rejected if it is missing, not DICOM, or another instance."""
    try:
        ds = dcmread(path)
    except FileNotFoundError:
        raise Rejected("dicom_missing", f"{path} is gone (moved on to an archive?)") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise Rejected("dicom_unreadable", f"{path}: {err}") from None
    if str(ds.get("SOPInstanceUID", "")) != sop_instance_uid:
        raise Rejected("dicom_mismatch", f"{path} holds SOP Instance "
                       f"{ds.get('SOPInstanceUID')!s:.64}, not {sop_instance_uid}")
    return ds


class _TimeoutSession(requests.Session):
    """A session whose every request has a timeout (dicomweb-client sets none) and checks
    the PACS's certificate against ``pacs.ca_file``: requests lets REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE in the environment override a session's own CA, unless each request
    names it."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("verify", self.verify)
        return super().request(*args, **kwargs)


class StowSender:
    """DICOMweb STOW-RS (PS3.18): one POST of multipart/related application/dicom to
    ``<url>/studies``, through dicomweb-client."""

    transport = "stow-rs"

    def __init__(self, config: PacsConfig) -> None:
        from dicomweb_client.api import DICOMwebClient

        assert config.url is not None  # the config's validator says so
        self.url = config.url.rstrip("/")
        session = _TimeoutSession(config.timeout_s)
        if config.username is not None:
            session.auth = (config.username, config.password() or "")
        if config.ca_file is not None:
            session.verify = str(config.ca_file)
        if config.cert_file is not None:
            session.cert = (str(config.cert_file), str(config.key_file))
        self.session = session
        self.client = DICOMwebClient(self.url, session=session)
        # Its own retries (seconds of waits inside one send) would hide the PACS's state
        # from the forwarder, whose queue retries with its own, logged backoff.
        self.client.set_http_retry_params(retry=False)

    def send(self, path: Path, sop_instance_uid: str) -> None:
        ds = read_dicom(path, sop_instance_uid)
        try:
            answer = self.client.store_instances([ds])
        except requests.HTTPError as err:
            raise _http_error(err) from None
        except requests.RequestException as err:  # refused, reset, timed out, TLS...
            raise RetryLater("unreachable", f"{self.url}: {_short(err)}") from None
        _check_stow_answer(answer, sop_instance_uid)

    def probe(self) -> str:
        # QIDO-RS with a limit of one: every DICOMweb server answers it, nothing is stored.
        try:
            answer = self.session.get(f"{self.url}/studies", params={"limit": "1"},
                                      headers={"Accept": "application/dicom+json"})
        except requests.RequestException as err:
            raise RetryLater("unreachable", f"{self.url}: {_short(err)}") from None
        if answer.status_code >= 400:
            raise RetryLater(f"http_{answer.status_code}",
                             f"{self.url}/studies answered HTTP {answer.status_code}")
        return f"{self.url} answers DICOMweb (HTTP {answer.status_code})"

    def close(self) -> None:
        self.session.close()


def _short(err: BaseException) -> str:
    return str(err)[:300]


def _http_error(err: requests.HTTPError) -> PacsError:
    status = err.response.status_code if err.response is not None else 0
    detail = f"HTTP {status}: {_short(err)}"
    if status in HTTP_RETRY or status >= 500 or status == 0:
        return RetryLater(f"http_{status}", detail)
    return Rejected(f"http_{status}", detail)


def _check_stow_answer(answer: Dataset, sop_instance_uid: str) -> None:
    """The STOW-RS answer names each instance stored (ReferencedSOPSequence) or failed
    (FailedSOPSequence, with a FailureReason); an instance in neither was not stored."""
    for item in answer.get("ReferencedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            return
    for item in answer.get("FailedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            reason = int(item.get("FailureReason", 0xC000))
            if reason == 0x0111:  # duplicate SOP instance: the PACS holds it already
                return
            error = RetryLater if reason in _CSTORE_BUSY else Rejected
            raise error(f"status_{reason:#06x}", f"the PACS refused instance "
                        f"{sop_instance_uid} (FailureReason {reason:#06x})")
    raise RetryLater("not_stored", f"the PACS's answer does not name instance "
                     f"{sop_instance_uid}")


class CStoreSender:
    """DIMSE C-STORE (PS3.7) through pynetdicom: one association per send, proposing the
    file's own SOP class and transfer syntax (the JPEG goes as it is, never transcoded)."""

    transport = "c-store"

    def __init__(self, config: PacsConfig) -> None:
        assert config.host is not None  # the config's validator says so
        self.config = config
        self.tls: tuple[ssl.SSLContext, str] | None = None
        if config.ca_file is not None:
            context = ssl.create_default_context(cafile=str(config.ca_file))
            if config.cert_file is not None:
                context.load_cert_chain(str(config.cert_file), str(config.key_file))
            self.tls = (context, config.host)

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.config.calling_ae_title)
        timeout = self.config.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        return ae

    def _associate(self, ae: Any) -> Any:
        c = self.config
        kwargs: dict[str, Any] = {"ae_title": c.called_ae_title}
        if self.tls is not None:
            kwargs["tls_args"] = self.tls
        assoc = ae.associate(c.host, c.port, **kwargs)
        if assoc.is_established:
            return assoc
        what = "rejected the association" if assoc.is_rejected else \
            "aborted the association" if assoc.is_aborted else "did not answer"
        # Our AE title not configured at the PACS, or the PACS down or busy: IT's or time's
        # to fix, not the instance's.
        raise RetryLater("association", f"{c.called_ae_title}@{c.host}:{c.port} {what}")

    def send(self, path: Path, sop_instance_uid: str) -> None:
        ds = read_dicom(path, sop_instance_uid)
        ae = self._ae()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = self._associate(ae)
        try:
            contexts = [cx for cx in assoc.accepted_contexts
                        if cx.abstract_syntax == ds.SOPClassUID]
            if not contexts:
                raise Rejected("sop_class_not_accepted", f"the PACS takes no "
                               f"{ds.SOPClassUID.name} in {ds.file_meta.TransferSyntaxUID.name}")
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        if not status or "Status" not in status:
            raise RetryLater("no_response", "the C-STORE got no answer (timeout or abort)")
        code = int(status.Status)
        if code in CSTORE_STORED or code == 0x0111:
            return
        error = RetryLater if code in _CSTORE_BUSY else Rejected
        raise error(f"status_{code:#06x}", f"the PACS answered C-STORE status {code:#06x}")

    def probe(self) -> str:
        from pynetdicom.sop_class import Verification

        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc = self._associate(ae)
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        c = self.config
        if not status or int(status.get("Status", -1)) != 0:
            # An association is already proof of reachability; C-ECHO may be disallowed.
            return f"{c.called_ae_title}@{c.host}:{c.port} accepts our association " \
                   f"({c.calling_ae_title}); C-ECHO not answered"
        return f"{c.called_ae_title}@{c.host}:{c.port} answers C-ECHO from {c.calling_ae_title}"

    def close(self) -> None:
        pass


def make_sender(config: PacsConfig) -> Sender:
    return StowSender(config) if config.transport == "stow-rs" else CStoreSender(config)


# pynetdicom logs every PDU at INFO under its own logger; what matters is in our events.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
