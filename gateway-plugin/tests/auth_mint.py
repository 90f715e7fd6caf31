# Mints the keys and JWTs of tests/auth.rs with PyJWT and cryptography, an implementation
# independent of the gateway's. Reads {"issuer", "audience"} on stdin, writes
# {"jwks": {...}, "tokens": {case: token}} on stdout. Keys are made here, each run: nothing
# secret is committed.
import base64
import hashlib
import hmac
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

spec = json.load(sys.stdin)
ISS, AUD = spec["issuer"], spec["audience"]
now = int(time.time())

rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ec_key = ec.generate_private_key(ec.SECP256R1())
ed_key = ed25519.Ed25519PrivateKey.generate()
stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
# The key an issuer rotates to (served by the test's JWKS URL after the rotation).
successor = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(algorithm, key, kid):
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    jwk["use"] = "sig"
    return jwk


jwks = {
    "keys": [
        public_jwk(jwt.algorithms.RSAAlgorithm, rsa_key, "rsa-1"),
        public_jwk(jwt.algorithms.ECAlgorithm, ec_key, "ec-1"),
        public_jwk(jwt.algorithms.OKPAlgorithm, ed_key, "ed-1"),
    ]
}


# After a rotation: the old key still published, and then only the new one.
jwks_rotated = {"keys": jwks["keys"] + [public_jwk(jwt.algorithms.RSAAlgorithm, successor, "rsa-next")]}
jwks_successor_only = {"keys": [public_jwk(jwt.algorithms.RSAAlgorithm, successor, "rsa-next")]}


def claims(**extra):
    base = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def mint(key, alg, kid, **extra):
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(claims(**extra), key, algorithm=alg, headers=headers)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header, payload, sign):
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(sign(signing_input.encode()))


TEAM_A = "invoke:team-a read:team-a cancel:team-a"
valid = mint(rsa_key, "RS256", "rsa-1", scope=TEAM_A)
head, payload, signature = valid.split(".")
forged_payload = b64(json.dumps(claims(scope="*")).encode())
rsa_public_pem = rsa_key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)

tokens = {
    "valid_rs256": valid,
    "valid_es256_scp": mint(ec_key, "ES256", "ec-1", scp=["invoke:team-a", "read:team-a"]),
    "valid_eddsa_admin": mint(ed_key, "EdDSA", "ed-1", scope="admin:*"),
    "team_b": mint(rsa_key, "RS256", "rsa-1", scope="invoke:team-b read:team-b"),
    "no_scope": mint(rsa_key, "RS256", "rsa-1", scope="openid profile"),
    "expired": mint(rsa_key, "RS256", "rsa-1", scope=TEAM_A, exp=now - 3600, iat=now - 7200),
    # Valid for a few seconds: a remembered (verified) token is not accepted past its exp.
    "short_lived": mint(rsa_key, "RS256", "rsa-1", scope=TEAM_A, exp=now + 10),
    "not_yet": mint(rsa_key, "RS256", "rsa-1", scope=TEAM_A, nbf=now + 3600),
    "no_exp": mint(rsa_key, "RS256", "rsa-1", scope=TEAM_A, exp=None),
    "wrong_issuer": mint(rsa_key, "RS256", "rsa-1", scope=TEAM_A, iss="https://other.test"),
    "wrong_audience": mint(rsa_key, "RS256", "rsa-1", scope=TEAM_A, aud="another-api"),
    "unknown_kid": mint(stranger, "RS256", "rsa-2", scope=TEAM_A),
    "no_kid": mint(rsa_key, "RS256", None, scope=TEAM_A),
    "unknown_key_known_kid": mint(stranger, "RS256", "rsa-1", scope=TEAM_A),
    "tampered": head + "." + forged_payload + "." + signature,
    "alg_none": handmade({"alg": "none", "kid": "rsa-1"}, claims(scope="*"), lambda _: b""),
    "hs256_public_key": handmade(
        {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"},
        claims(scope="*"),
        lambda m: hmac.new(rsa_public_pem, m, hashlib.sha256).digest(),
    ),
    "rotated": mint(successor, "RS256", "rsa-next", scope=TEAM_A),
    # Scopes from the policy file: groups and roles claims, no scope claim.
    "group_member": mint(rsa_key, "RS256", "rsa-1", sub="carol", groups=["staff", "team-a-admins"]),
    "group_other": mint(rsa_key, "RS256", "rsa-1", sub="dave", groups=["staff", "team-b-admins"]),
    "role_reader": mint(
        rsa_key, "RS256", "rsa-1", sub="erin", realm_access={"roles": ["offline_access", "auditor"]}
    ),
    "department": mint(rsa_key, "RS256", "rsa-1", sub="frank", department="genomics", scope="read:team-a"),
}

# The route table test: every team-a scope (in each algorithm), each one short of one action,
# every scope of team-b, and the queue-wide admin.
TEAM_A_ALL = ["invoke:team-a", "read:team-a", "cancel:team-a", "admin:team-a"]
tokens["table_a_rs256"] = mint(rsa_key, "RS256", "rsa-1", sub="table-a", scope=" ".join(TEAM_A_ALL))
tokens["table_a_es256"] = mint(ec_key, "ES256", "ec-1", sub="table-a", scp=TEAM_A_ALL)
tokens["table_a_eddsa"] = mint(ed_key, "EdDSA", "ed-1", sub="table-a", scope=" ".join(TEAM_A_ALL))
for action in ["invoke", "read", "cancel", "admin"]:
    short = [s for s in TEAM_A_ALL if not s.startswith(action + ":")]
    tokens["table_a_no_" + action] = mint(rsa_key, "RS256", "rsa-1", sub="table-a", scope=" ".join(short))
tokens["table_b"] = mint(
    rsa_key, "RS256", "rsa-1", sub="table-b", scope="invoke:team-b read:team-b cancel:team-b admin:team-b"
)
tokens["table_root"] = mint(ed_key, "EdDSA", "ed-1", sub="table-root", scope="admin:*")
json.dump(
    {
        "jwks": jwks,
        "jwks_rotated": jwks_rotated,
        "jwks_successor_only": jwks_successor_only,
        "tokens": tokens,
    },
    sys.stdout,
)
