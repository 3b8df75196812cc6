"""Real servers for the fetch tests, on loopback: moto's S3 (server mode, IAM auth on) and an HTTPS file server
with a trustme CA. Plus the tiny ImageFolder archive and the helpers the tests share."""

from __future__ import annotations

import hashlib
import http.server
import io
import ssl
import tarfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from trainer_util import make_image_folder

REGION = "us-east-1"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_folder_tar_gz(tmp: Path, per_class: int = 10) -> bytes:
    """Two learnable classes of 16 px PNGs, as a .tar.gz of `<class>/<n>.png`."""
    root = make_image_folder(tmp / "images-src", {"cat": per_class, "dog": per_class}, size=16)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(root.rglob("*.png")):
            tar.add(path, arcname=str(path.relative_to(root)))
    return buf.getvalue()


@dataclass
class S3:
    endpoint: str
    bucket: str
    key_id: str
    secret: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret)


def start_s3(objects: dict[str, bytes]):
    """moto's ThreadedMotoServer with a bucket holding `objects`, and an IAM user allowed to read it; once set
    up, every request must be signed by a known key (moto's IAM authentication). Returns (server, S3)."""
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto's backends are global to the process: a server started earlier in this run (another test module)
    # left its users and buckets there. Start from nothing.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    admin = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument='{"Version": "2012-10-17", '
                        '"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}')
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    s3 = boto3.client("s3", **admin)
    s3.create_bucket(Bucket="ml-data")
    for name, data in objects.items():
        s3.put_object(Bucket="ml-data", Key=name, Body=data)
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from here on: signed by a known key, or AccessDenied
    return server, S3(endpoint, "ml-data", key["AccessKeyId"], key["SecretAccessKey"])


def stop_s3(server) -> None:
    from moto import settings

    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    server.stop()


@dataclass
class Https:
    url: str
    ca_file: Path
    files: dict[str, bytes]
    token: str | None = None
    requests: list[str] = field(default_factory=list)


def start_https(tmp: Path, files: dict[str, bytes], token: str | None = None):
    """A stdlib HTTPS server (certificate for 127.0.0.1 from a trustme CA) serving `files`; with `token`,
    only to `Authorization: Bearer <token>` (else 403). Returns (server, Https)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    state = Https("", ca_file, files, token)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append(self.path)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                self.send_error(403)
                return
            body = state.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    return server, state


def write_secret(root: Path, name: str, values: dict[str, str]) -> Path:
    """A Secret as the fetch container sees it mounted: <root>/<name>/<key> files."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in values.items():
        (folder / key).write_text(value)
    return root
