"""A small S3 client: AWS Signature V4 over :mod:`http.client`, one keep-alive connection per
thread.  Only what a repository needs: HEAD, GET, PUT (optionally ``If-None-Match: *``),
DELETE, multi-object delete, ListObjectsV2, bucket create/head.

Why not boto3 (measured by ``bench/s3_bench.py --clients``, figures in doc/remote.md): the
same PUT throughput on a loopback SeaweedFS (the server's), while boto3 costs 0.2-0.3 s and
15 MiB more per process, answers HEAD (once per chunk of an unchanged backup) about 3 times
slower, and would be a new dependency of the Debian package.  Settings (endpoint, region,
credentials) follow the AWS conventions: see :func:`load_settings`.

Errors (doc/exit-codes.md): an endpoint that never answered is
:class:`~ganeti_vol.core.errors.HostUnreachable`; one that stopped answering, or answered an
error, :class:`~ganeti_vol.core.errors.RemoteError`; refused credentials (or none)
:class:`~ganeti_vol.core.errors.AuthError`; a denied access
:class:`~ganeti_vol.core.errors.RemoteRefused`.  Transient failures (connection reset,
500/502/503/504, SlowDown) are retried with backoff first.
"""

from __future__ import annotations

import configparser
import datetime
import email.utils
import hashlib
import hmac
import http.client
import logging
import os
import random
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from base64 import b64encode
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import errors as E

log = logging.getLogger(__name__)

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_EMPTY_SHA = hashlib.sha256(b"").hexdigest()
#: attempts after the first for a failed request (node config ``[s3] retries``)
RETRIES = 4
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                         "ExpiredToken", "AuthorizationHeaderMalformed", "InvalidSecurity",
                         "TokenRefreshRequired"})


@dataclass(frozen=True)
class Settings:
    endpoint: str
    region: str
    access_key: str
    secret_key: str
    session_token: str | None = None
    #: where the settings came from, for error messages
    source: str = ""


def _aws_file(path: str, section: str) -> dict[str, str]:
    cp = configparser.RawConfigParser()
    try:
        cp.read(path)
    except (configparser.Error, OSError) as err:
        raise E.UsageError(f"cannot read AWS file '{path}': {err}") from err
    return dict(cp.items(section)) if cp.has_section(section) else {}


def load_settings(node: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Endpoint, region and credentials, each from the first place that has it:

    1. the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
       ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
       ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``);
    2. the node config's ``[s3]`` section (``endpoint``, ``region``,
       ``access_key_id``, ``secret_access_key``, ``profile``);
    3. the profile (``AWS_PROFILE``, else the node config's ``profile``, else ``default``) in
       ``~/.aws/credentials`` (``AWS_SHARED_CREDENTIALS_FILE``) and ``~/.aws/config``
       (``AWS_CONFIG_FILE``; ``region``, ``endpoint_url``).

    Without an endpoint anywhere: AWS, ``https://s3.<region>.amazonaws.com``.
    """
    env = os.environ if environ is None else environ
    node = dict(node or {})
    profile = env.get("AWS_PROFILE") or node.get("profile") or "default"
    home = os.path.expanduser("~")
    cred_file = env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws",
                                                                          "credentials")
    conf_file = env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
    creds = _aws_file(cred_file, profile)
    conf = _aws_file(conf_file, "default" if profile == "default" else f"profile {profile}")

    def pick(env_names: tuple[str, ...], node_key: str, file_keys: tuple[tuple[dict[str, str],
             str], ...]) -> tuple[str | None, str]:
        for name in env_names:
            if env.get(name):
                return env[name], f"${name}"
        if node.get(node_key):
            return str(node[node_key]), f"node config [s3] {node_key}"
        for d, key in file_keys:
            if d.get(key):
                return d[key], f"profile '{profile}'"
        return None, ""

    access, src = pick(("AWS_ACCESS_KEY_ID",), "access_key_id",
                       ((creds, "aws_access_key_id"), (conf, "aws_access_key_id")))
    secret, _ = pick(("AWS_SECRET_ACCESS_KEY",), "secret_access_key",
                     ((creds, "aws_secret_access_key"), (conf, "aws_secret_access_key")))
    token, _ = pick(("AWS_SESSION_TOKEN",), "session_token",
                    ((creds, "aws_session_token"), (conf, "aws_session_token")))
    region, _ = pick(("AWS_REGION", "AWS_DEFAULT_REGION"), "region", ((conf, "region"),))
    region = region or "us-east-1"
    endpoint, _ = pick(("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "endpoint",
                       ((conf, "endpoint_url"),))
    endpoint = (endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
    if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise E.UsageError(f"invalid S3 endpoint '{endpoint}': use http://HOST[:PORT] or "
                           "https://HOST[:PORT]")
    if not access or not secret:
        raise E.AuthError(
            f"no S3 credentials for {endpoint}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, [s3] access_key_id and secret_access_key in the node "
            f"config, or profile '{profile}' in {cred_file}")
    return Settings(endpoint, region, access, secret, token, src)


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _quote(s: str) -> str:
    return urllib.parse.quote(s, safe="-_.~/")


class S3Client:
    """Thread-safe: each thread has its own connection."""

    def __init__(self, settings: Settings, *, timeout: float = 60.0,
                 retries: int = RETRIES) -> None:
        self.settings = settings
        u = urllib.parse.urlsplit(settings.endpoint)
        self.https = u.scheme == "https"
        self.host = u.netloc
        self.base = u.path.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._keys: tuple[str, bytes] | None = None
        #: bytes of request bodies sent (PUTs), for reports and tests
        self.bytes_sent = 0
        #: set when the endpoint stopped answering after every retry: later requests (other
        #: threads, cleanup) try once instead of backing off again
        self._gone = False
        #: the endpoint answered once (a later failure means it went away)
        self._answered = False

    # -- connections ----------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            c = cls(self.host, timeout=self.timeout)
            self._local.conn = c
            with self._lock:
                self._conns.append(c)
        return c

    def _drop(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()

    # -- signing --------------------------------------------------------------------------

    def _signing_key(self, day: str) -> bytes:
        if self._keys is None or self._keys[0] != day:
            k = _sign(("AWS4" + self.settings.secret_key).encode(), day)
            for part in (self.settings.region, "s3", "aws4_request"):
                k = _sign(k, part)
            self._keys = (day, k)
        return self._keys[1]

    def _headers(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
                 payload_hash: str) -> dict[str, str]:
        now = datetime.datetime.now(datetime.UTC)
        amzdate, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        h = {k.lower(): str(v).strip() for k, v in headers.items()}
        h["host"] = self.host
        h["x-amz-date"] = amzdate
        h["x-amz-content-sha256"] = payload_hash
        if self.settings.session_token:
            h["x-amz-security-token"] = self.settings.session_token
        names = sorted(h)
        cq = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                      for k, v in sorted(query.items()))
        creq = "\n".join([method, path, cq, *(f"{n}:{h[n]}" for n in names), "",
                          ";".join(names), payload_hash])
        scope = f"{day}/{self.settings.region}/s3/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope,
                         hashlib.sha256(creq.encode()).hexdigest()])
        sig = hmac.new(self._signing_key(day), sts.encode(), hashlib.sha256).hexdigest()
        h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.settings.access_key}/{scope}, "
                              f"SignedHeaders={';'.join(names)}, Signature={sig}")
        return h

    # -- requests -------------------------------------------------------------------------

    def request(self, method: str, bucket: str, key: str = "", *,
                query: dict[str, str] | None = None, body: bytes | bytearray | memoryview = b"",
                headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,),
                what: str = "") -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of a request whose status is in ``ok``; else an error.

        Path-style addressing (``/bucket/key``), which every S3-compatible store accepts.
        """
        query = query or {}
        path = _quote(f"{self.base}/{bucket}" + (f"/{key}" if key else "" if bucket else "/"))
        payload_hash = hashlib.sha256(body).hexdigest() if len(body) else _EMPTY_SHA
        target = path + ("?" + urllib.parse.urlencode(sorted(query.items()),
                                                       quote_via=urllib.parse.quote)
                         if query else "")
        what = what or f"s3://{bucket}/{key}"
        attempt = 0
        while True:
            hdrs = self._headers(method, path, query, headers or {}, payload_hash)
            if len(body):
                hdrs["content-length"] = str(len(body))
            try:
                conn = self._conn()
                conn.request(method, target, body=body if len(body) else None, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                rh = {k.lower(): v for k, v in resp.getheaders()}
                if resp.will_close:
                    self._drop()
            except (OSError, http.client.HTTPException) as err:
                self._drop()
                if attempt < self.retries and not self._gone:
                    attempt += 1
                    self._backoff(attempt, f"{method} {what}: {err}")
                    continue
                cause = getattr(err, "strerror", None) or str(err) or type(err).__name__
                self._gone = True
                if not self._answered:
                    raise E.HostUnreachable(f"cannot {method} {what}: S3 endpoint "
                                            f"{self.settings.endpoint} is unreachable "
                                            f"({cause})") from err
                raise E.RemoteError(f"cannot {method} {what}: S3 endpoint "
                                    f"{self.settings.endpoint} went away ({cause}); run the "
                                    "command again to resume") from err
            self._gone = False
            self._answered = True
            if status in ok:
                if method == "PUT":
                    self.bytes_sent += len(body)
                return status, rh, data
            code, message = _error_code(data)
            if (status in _RETRY_STATUS or code == "SlowDown") and attempt < self.retries:
                attempt += 1
                self._backoff(attempt, f"{method} {what}: {status} {code}")
                continue
            raise self._error(method, what, status, code, message)

    def _backoff(self, attempt: int, why: str) -> None:
        delay = min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)
        log.info("retrying in %.1f s: %s", delay, why)
        time.sleep(delay)

    def _error(self, method: str, what: str, status: int, code: str,
               message: str) -> E.GanetiVolError:
        detail = f"{status} {code}" + (f": {message}" if message else "")
        if code == "NoSuchBucket":
            return E.ArchiveError(f"cannot {method} {what}: no such bucket at "
                                  f"{self.settings.endpoint} ({detail})")
        src = f" (access key from {self.settings.source})" if self.settings.source else ""
        if code in _AUTH_CODES or (status == 403 and code != "AccessDenied"):
            return E.AuthError(f"cannot {method} {what}: S3 endpoint {self.settings.endpoint} "
                               f"refused the credentials{src} ({detail})")
        if status == 403:
            return E.RemoteRefused(f"cannot {method} {what}: S3 endpoint "
                                   f"{self.settings.endpoint} denied the access{src} ({detail})")
        return E.RemoteError(f"cannot {method} {what}: S3 endpoint {self.settings.endpoint} "
                             f"answered {detail}")

    # -- operations -----------------------------------------------------------------------

    def head(self, bucket: str, key: str) -> tuple[int, float] | None:
        """(size, last-modified epoch) of an object, or None if there is none."""
        status, h, _ = self.request("HEAD", bucket, key, ok=(200, 404))
        if status == 404:
            return None
        return int(h.get("content-length", 0)), http_time(h.get("last-modified"))

    def get(self, bucket: str, key: str) -> bytes | None:
        status, _, data = self.request("GET", bucket, key, ok=(200, 404))
        if status == 404:
            code, _ = _error_code(data)
            if code == "NoSuchBucket":
                raise self._error("GET", f"s3://{bucket}/{key}", 404, code, "")
            return None
        return data

    def put(self, bucket: str, key: str, data: bytes | bytearray | memoryview, *,
            if_none_match: bool = False) -> tuple[bool, float]:
        """Store an object; (stored, server time).  ``if_none_match``: only if absent (a
        server that honours ``If-None-Match: *`` answers 412 when it exists: (False, …))."""
        headers = {"If-None-Match": "*"} if if_none_match else {}
        status, h, _ = self.request("PUT", bucket, key, body=data, headers=headers,
                                    ok=(200, 412) if if_none_match else (200,))
        return status == 200, http_time(h.get("date"))

    def delete(self, bucket: str, key: str) -> None:
        self.request("DELETE", bucket, key, ok=(200, 204, 404))

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            part = keys[i:i + 1000]
            body = ("<Delete><Quiet>true</Quiet>" + "".join(
                f"<Object><Key>{_xml_escape(k)}</Key></Object>" for k in part)
                + "</Delete>").encode()
            md5 = b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
            _, _, data = self.request("POST", bucket, query={"delete": ""}, body=body,
                                      headers={"Content-MD5": md5,
                                               "Content-Type": "application/xml"},
                                      what=f"s3://{bucket} (delete {len(part)} objects)")
            root = ET.fromstring(data) if data.strip() else None
            errs = [] if root is None else root.findall(f"{_NS}Error")
            if errs:
                code = errs[0].findtext(f"{_NS}Code") or ""
                key = errs[0].findtext(f"{_NS}Key") or ""
                raise E.RemoteError(f"cannot delete s3://{bucket}/{key}: {code}")

    def list(self, bucket: str, prefix: str = "", *, delimiter: str | None = None
             ) -> Iterator[tuple[str, int, float]]:
        """(key, size, last-modified) of every object under ``prefix``; with a
        ``delimiter``, common prefixes come as (prefix, -1, 0.0)."""
        token: str | None = None
        while True:
            q = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if delimiter:
                q["delimiter"] = delimiter
            if token:
                q["continuation-token"] = token
            _, _, data = self.request("GET", bucket, query=q,
                                      what=f"s3://{bucket}/{prefix} (list)")
            root = ET.fromstring(data)
            for c in root.findall(f"{_NS}Contents"):
                yield (c.findtext(f"{_NS}Key") or "", int(c.findtext(f"{_NS}Size") or 0),
                       _iso_time(c.findtext(f"{_NS}LastModified")))
            for p in root.findall(f"{_NS}CommonPrefixes"):
                yield p.findtext(f"{_NS}Prefix") or "", -1, 0.0
            if (root.findtext(f"{_NS}IsTruncated") or "false").lower() != "true":
                return
            token = root.findtext(f"{_NS}NextContinuationToken")
            if not token:
                return

    def bucket_exists(self, bucket: str) -> bool:
        status, _, _ = self.request("HEAD", bucket, ok=(200, 404), what=f"s3://{bucket}")
        return status == 200

    def create_bucket(self, bucket: str) -> None:
        body = b""
        if self.settings.region != "us-east-1":
            body = (f'<CreateBucketConfiguration xmlns="{_NS[1:-1]}"><LocationConstraint>'
                    f"{self.settings.region}</LocationConstraint></CreateBucketConfiguration>"
                    ).encode()
        self.request("PUT", bucket, body=body, ok=(200, 409), what=f"s3://{bucket}")


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _error_code(data: bytes) -> tuple[str, str]:
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return "", ""
    return (root.findtext("Code") or root.findtext(f"{_NS}Code") or "",
            (root.findtext("Message") or "")[:200])


def http_time(text: str | None) -> float:
    if not text:
        return time.time()
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return time.time()


def _iso_time(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
