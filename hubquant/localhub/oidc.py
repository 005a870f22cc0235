"""Trusted publishing on the local Hub: `POST /oauth/token` exchanges a CI's OIDC id token for a short-lived token
that may write to one repo, as the Hub does (https://huggingface.co/docs/hub/trusted-publishers).

The request is RFC 8693 token exchange (JSON, or a form): `grant_type` token-exchange, `subject_token_type`
id_token, `subject_token` (the JWT), `resource` (`ns/name`, `datasets/ns/name`, `spaces/ns/name`). The Hub
accepts it when the resource's repo has a trusted publisher whose issuer signed the JWT (RS256, a key of the
issuer's JWKS, found through `{issuer}/.well-known/openid-configuration`), whose audience is this Hub's URL, which
has not expired, and whose claims equal every claim the publisher pins (`repository`, `workflow` = the workflow
file, `ref`, `branch`, or any other claim by name). Only issuers named by a publisher are ever fetched. Answer:
`{"access_token", "token_type": "bearer", "expires_in", "issued_token_type"}`; a refusal is 400
`invalid_request` or `invalid_grant` with one description for every failed check (the reason goes to the log).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import time
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse

from hubquant.localhub.protocol import PLURAL, Ctx, HubHTTPError

log = logging.getLogger("hubquant.localhub")
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
AUDIENCE_ENV = "HUBQUANT_HUB_OIDC_AUDIENCE"  # the `aud` to require (default: this Hub's URL, as clients request)
TOKEN_TTL = 3600  # seconds, as the Hub's trusted-publisher tokens
LEEWAY = 30  # seconds of clock skew allowed on exp / nbf / iat
FETCH_TIMEOUT = 10.0
REFUSED = "The OIDC token could not be exchanged for this resource"


class Refused(Exception):
    """One failed check; the reason is logged, never sent."""


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64_int(part: str) -> int:
    return int.from_bytes(_b64(part), "big")


def split_jwt(token: str) -> tuple[dict, dict, bytes, bytes]:
    """(header, claims, signing input, signature) of a compact JWS, not yet verified."""
    parts = token.split(".")
    if len(parts) != 3:
        raise Refused("not a compact JWS")
    try:
        header, claims = json.loads(_b64(parts[0])), json.loads(_b64(parts[1]))
        signature = _b64(parts[2])
    except (ValueError, TypeError) as e:
        raise Refused(f"undecodable JWT ({type(e).__name__})") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Refused("JWT header or payload is not an object")
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), signature


def fetch_jwks(issuer: str) -> dict:
    """The issuer's JWKS, through its discovery document (which must name the same issuer)."""
    import httpx

    try:
        conf = httpx.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration", timeout=FETCH_TIMEOUT)
        conf.raise_for_status()
        doc = conf.json()
        if doc.get("issuer") != issuer:
            raise Refused(f"discovery document names issuer {doc.get('issuer')!r}")
        keys = httpx.get(doc["jwks_uri"], timeout=FETCH_TIMEOUT)
        keys.raise_for_status()
        return keys.json()
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise Refused(f"cannot read the issuer's keys ({type(e).__name__})") from None


def verify_signature(header: dict, signing_input: bytes, signature: bytes, jwks: dict) -> None:
    """RS256 with the JWKS key named by `kid` (no other algorithm: never `none`, never HMAC)."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        raise Refused("the `cryptography` package is not installed: pip install cryptography") from None

    if header.get("alg") != "RS256":
        raise Refused(f"algorithm {header.get('alg')!r} is not RS256")
    keys = [k for k in jwks.get("keys", []) if isinstance(k, dict) and k.get("kty") == "RSA"
            and k.get("kid") == header.get("kid")]
    if not keys:
        raise Refused(f"no RSA key {header.get('kid')!r} in the issuer's JWKS")
    try:
        key = rsa.RSAPublicNumbers(_b64_int(keys[0]["e"]), _b64_int(keys[0]["n"])).public_key()
        key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, KeyError) as e:
        raise Refused(f"bad signature ({type(e).__name__})") from None


def check_claims(claims: dict, *, issuer: str, audience: str, now: float) -> None:
    if claims.get("iss") != issuer:
        raise Refused("issuer mismatch")
    aud = claims.get("aud")
    if audience not in (aud if isinstance(aud, list) else [aud]):
        raise Refused(f"audience {aud!r} is not {audience!r}")
    exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
    if not isinstance(exp, int | float) or exp <= now - LEEWAY:
        raise Refused("expired (or no exp)")
    if any(isinstance(t, int | float) and t > now + LEEWAY for t in (nbf, iat)):
        raise Refused("not valid yet")


def claim_value(claims: dict, name: str):
    """A claim as publishers name it: `workflow` is the workflow file (from `workflow_ref`), `branch` the branch."""
    if name == "workflow" and isinstance(claims.get("workflow_ref"), str):
        return claims["workflow_ref"].split("@", 1)[0].rsplit("/", 1)[-1]
    if name == "branch" and isinstance(claims.get("ref"), str):
        return claims["ref"].removeprefix("refs/heads/")
    return claims.get(name)


def parse_resource(resource: str) -> tuple[str, str]:
    """(repo type, repo id) of `ns/name`, `datasets/ns/name`, `spaces/ns/name`."""
    parts = resource.split("/")
    if len(parts) == 3 and parts[0] in PLURAL:
        return PLURAL[parts[0]], f"{parts[1]}/{parts[2]}"
    if len(parts) == 2 and all(parts):
        return "model", resource
    raise HubHTTPError(400, "invalid_request", body={"error_description": "resource must be a repo: ns/name, "
                                                     "datasets/ns/name or spaces/ns/name"})


def _params(ctx: Ctx) -> dict:
    ctype = ctx.request.headers.get("content-type", "")
    if ctype.startswith("application/x-www-form-urlencoded"):
        return dict(parse_qsl(ctx.body.decode("utf-8", "replace")))
    try:
        p = json.loads(ctx.body or b"{}")
    except (ValueError, RecursionError):
        p = None
    if not isinstance(p, dict):
        raise HubHTTPError(400, "invalid_request", body={"error_description": "expected a JSON object body"})
    return p


def token_exchange(ctx: Ctx) -> JSONResponse:
    """POST /oauth/token (RFC 8693): a CI's id token for a token scoped to one repo."""
    p = _params(ctx)
    if p.get("grant_type") != GRANT_TYPE:
        raise HubHTTPError(400, "unsupported_grant_type",
                           body={"error_description": f"grant_type must be {GRANT_TYPE}"})
    token, resource = p.get("subject_token"), p.get("resource")
    if p.get("subject_token_type") != ID_TOKEN_TYPE or not isinstance(token, str) or not isinstance(resource, str):
        raise HubHTTPError(400, "invalid_request", body={
            "error_description": f"subject_token_type must be {ID_TOKEN_TYPE}, with subject_token and resource"})
    repo_type, repo_id = parse_resource(resource)
    audience = os.environ.get(AUDIENCE_ENV) or ctx.base
    try:
        claims, issuer = _verify(ctx, token, repo_type, repo_id, audience)
    except Refused as e:
        log.warning("trusted publishing: refused a token exchange for %s: %s", resource, e)
        raise HubHTTPError(400, "invalid_grant", body={"error_description": REFUSED}) from None
    access = ctx.store.add_repo_token(repo_id, repo_type, ttl=TOKEN_TTL, issuer=issuer, subject=str(claims.get("sub")))
    log.warning("trusted publishing: %s (%s) may write to %s for %d s", claims.get("sub"), issuer, resource, TOKEN_TTL)
    return JSONResponse({"access_token": access, "token_type": "bearer", "expires_in": TOKEN_TTL,
                         "issued_token_type": ACCESS_TOKEN_TYPE}, headers={"Cache-Control": "no-store"})


def _verify(ctx: Ctx, token: str, repo_type: str, repo_id: str, audience: str) -> tuple[dict, str]:
    header, claims, signing_input, signature = split_jwt(token)
    try:
        publishers = ctx.store.publishers(repo_id, repo_type)
    except Exception:  # noqa: BLE001 - an unknown repo is refused like any other mismatch
        raise Refused("no such repo") from None
    issuer = claims.get("iss")
    rules = [claims_ for iss, claims_ in publishers if iss == issuer]
    if not rules:
        raise Refused(f"no trusted publisher with issuer {issuer!r}")
    verify_signature(header, signing_input, signature, fetch_jwks(issuer))
    check_claims(claims, issuer=issuer, audience=audience, now=time.time())
    if not any(all(claim_value(claims, k) == v for k, v in rule.items()) for rule in rules):
        raise Refused("claims match no trusted publisher")
    return claims, issuer
