"""An OIDC issuer on 127.0.0.1 that behaves like GitHub Actions' (for trusted-publishing tests).

It serves `/.well-known/openid-configuration` and `/.well-known/jwks` (an RSA key made at start), and mints id
tokens at `GET /_apis/token?api-version=2.0&audience=AUD` for a caller holding the request token, answering
`{"count": N, "value": JWT}` as GitHub's runtime does behind ACTIONS_ID_TOKEN_REQUEST_URL. Claims follow GitHub's
(iss, aud, sub `repo:OWNER/REPO:ref:REF`, repository, repository_owner, ref, workflow, workflow_ref,
job_workflow_ref, sha, run_id, iat, nbf, exp, jti); `overrides` changes them for the next tokens (a foreign
repository, another audience, an expiry in the past), `sign_with` swaps in a key the JWKS does not publish.
"""
from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def sign_rs256(claims: dict, key: rsa.RSAPrivateKey, kid: str, alg: str = "RS256") -> str:
    head = b64url(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()) if alg == "RS256" else b""
    return f"{head}.{body}.{b64url(sig)}"


class GitHubIssuer:
    """`with GitHubIssuer(repository="acme/ci", workflow_file="convert.yml") as iss:` ... `iss.env(endpoint)`."""

    def __init__(self, *, repository: str, workflow_file: str, ref: str = "refs/heads/main"):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self.sign_with: rsa.RSAPrivateKey | None = None
        self.request_token = secrets.token_urlsafe(24)
        self.repository, self.workflow_file, self.ref = repository, workflow_file, ref
        self.overrides: dict = {}
        self.minted: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (path with query, Authorization header)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def claims(self, audience: str) -> dict:
        now = int(time.time())
        wf = f"{self.repository}/.github/workflows/{self.workflow_file}@{self.ref}"
        c = {"iss": self.url, "aud": audience, "sub": f"repo:{self.repository}:ref:{self.ref}",
             "repository": self.repository, "repository_owner": self.repository.split("/")[0], "ref": self.ref,
             "workflow": "Convert releases", "workflow_ref": wf, "job_workflow_ref": wf, "sha": "0" * 40,
             "run_id": "1", "event_name": "workflow_dispatch", "iat": now, "nbf": now - 5, "exp": now + 300,
             "jti": secrets.token_hex(8)}
        c.update(self.overrides)
        return c

    def jwks(self) -> dict:
        pub = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                          "n": _int_b64(pub.n), "e": _int_b64(pub.e)}]}

    def mint(self, audience: str) -> str:
        token = sign_rs256(self.claims(audience), self.sign_with or self.key, self.kid)
        self.minted.append(token)
        return token

    def env(self) -> dict[str, str]:
        """What a GitHub job with `permissions: id-token: write` sees."""
        return {"GITHUB_ACTIONS": "true", "ACTIONS_ID_TOKEN_REQUEST_URL": f"{self.url}/_apis/token?api-version=2.0",
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN": self.request_token}

    def _handler(self):
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, status: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlsplit(self.path)
                auth = self.headers.get("Authorization", "")
                issuer.requests.append((self.path, auth))
                if url.path == "/.well-known/openid-configuration":
                    return self._json(200, {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/.well-known/jwks",
                                            "response_types_supported": ["id_token"],
                                            "id_token_signing_alg_values_supported": ["RS256"]})
                if url.path == "/.well-known/jwks":
                    return self._json(200, issuer.jwks())
                if url.path == "/_apis/token":
                    if auth.partition(" ")[2] != issuer.request_token or auth.partition(" ")[0].lower() != "bearer":
                        return self._json(401, {"message": "bad request token"})
                    query = parse_qs(url.query)
                    if query.get("api-version") != ["2.0"] or not query.get("audience"):
                        return self._json(400, {"message": "api-version and audience required"})
                    return self._json(200, {"count": 1, "value": issuer.mint(query["audience"][0])})
                return self._json(404, {"message": "not found"})

        return Handler

    def __enter__(self) -> GitHubIssuer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
