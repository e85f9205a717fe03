"""Standard Webhooks signatures, checked against the scheme's reference library (standardwebhooks)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
import standardwebhooks

from shared.webhook_signing import (
    WebhookVerificationError,
    new_secret,
    secret_bytes,
    sign,
    signed_headers,
    verify,
)

BODY = (
    b'{"type":"comparison.finished","timestamp":"2026-11-28T10:00:00Z",'
    b'"data":{"id":"c1","name":"caf\xc3\xa9"}}'
)
# The example secret of the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class TestSecrets:
    def test_a_new_secret_is_whsec_and_32_random_bytes(self):
        first, second = new_secret(), new_secret()
        assert first.startswith("whsec_") and second.startswith("whsec_")
        assert len(secret_bytes(first)) == 32
        assert first != second

    def test_the_prefix_and_padding_are_optional(self):
        raw = SPEC_SECRET.removeprefix("whsec_")
        assert secret_bytes(SPEC_SECRET) == secret_bytes(raw) == base64.b64decode(raw)

    def test_a_malformed_secret_is_refused(self):
        with pytest.raises(WebhookVerificationError, match="not base64"):
            secret_bytes("whsec_not base64!")


class TestSigning:
    def test_the_signature_is_hmac_sha256_of_id_timestamp_body(self):
        expected = hmac.new(secret_bytes(SPEC_SECRET), b"msg_1.1700000000." + BODY, hashlib.sha256).digest()
        assert sign(SPEC_SECRET, msg_id="msg_1", timestamp=1700000000, body=BODY) == (
            "v1," + base64.b64encode(expected).decode()
        )

    def test_it_equals_the_reference_library(self):
        secret = new_secret()
        reference = standardwebhooks.Webhook(secret).sign(
            msg_id="msg_1", timestamp=datetime.fromtimestamp(1700000000, UTC), data=BODY.decode()
        )
        assert sign(secret, msg_id="msg_1", timestamp=1700000000, body=BODY) == reference

    def test_two_secrets_give_two_space_separated_signatures(self):
        new, old = new_secret(), new_secret()
        headers = signed_headers([new, old], msg_id="msg_1", timestamp=1700000000, body=BODY)
        assert headers["webhook-id"] == "msg_1"
        assert headers["webhook-timestamp"] == "1700000000"
        assert headers["webhook-signature"].split(" ") == [
            sign(new, msg_id="msg_1", timestamp=1700000000, body=BODY),
            sign(old, msg_id="msg_1", timestamp=1700000000, body=BODY),
        ]


class TestVerify:
    def fresh(self, *secrets: str, msg_id: str = "msg_1") -> dict[str, str]:
        return signed_headers(list(secrets), msg_id=msg_id, timestamp=int(time.time()), body=BODY)

    def test_a_signed_delivery_verifies_here_and_with_the_reference_library(self):
        secret = new_secret()
        headers = self.fresh(secret)
        assert verify(BODY, headers, secret)["data"]["name"] == "café"
        assert standardwebhooks.Webhook(secret).verify(BODY, headers)["data"]["id"] == "c1"

    def test_what_the_reference_library_signs_verifies_here(self):
        secret = new_secret()
        now = datetime.now(UTC)
        signature = standardwebhooks.Webhook(secret).sign(msg_id="msg_9", timestamp=now, data=BODY.decode())
        headers = {
            "Webhook-Id": "msg_9",
            "Webhook-Timestamp": str(int(now.timestamp())),
            "Webhook-Signature": signature,
        }
        assert verify(BODY, headers, secret)["type"] == "comparison.finished"

    def test_either_of_two_signatures_is_enough(self):
        new, old = new_secret(), new_secret()
        headers = self.fresh(new, old)
        assert verify(BODY, headers, new)["data"]["id"] == "c1"
        assert verify(BODY, headers, old)["data"]["id"] == "c1"
        assert standardwebhooks.Webhook(old).verify(BODY, headers)["data"]["id"] == "c1"
        with pytest.raises(WebhookVerificationError, match="no signature matches"):
            verify(BODY, headers, new_secret())

    def test_a_receiver_may_hold_several_secrets(self):
        secret = new_secret()
        assert verify(BODY, self.fresh(secret), [new_secret(), secret])["data"]["id"] == "c1"

    @pytest.mark.parametrize(
        "tamper",
        [
            lambda body, headers: (body.replace(b"c1", b"c2"), headers),
            lambda body, headers: (body, {**headers, "webhook-id": "msg_2"}),
            lambda body, headers: (
                body,
                {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)},
            ),
        ],
        ids=["body", "id", "timestamp"],
    )
    def test_any_change_breaks_the_signature(self, tamper):
        secret = new_secret()
        body, headers = tamper(BODY, self.fresh(secret))
        with pytest.raises(WebhookVerificationError, match="no signature matches"):
            verify(body, headers, secret)
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(secret).verify(body, headers)

    def test_old_and_future_timestamps_are_refused(self):
        secret = new_secret()
        now = time.time()
        old = signed_headers([secret], msg_id="m", timestamp=int(now) - 301, body=BODY)
        future = signed_headers([secret], msg_id="m", timestamp=int(now) + 301, body=BODY)
        with pytest.raises(WebhookVerificationError, match="too old"):
            verify(BODY, old, secret, now=now)
        with pytest.raises(WebhookVerificationError, match="future"):
            verify(BODY, future, secret, now=now)
        assert verify(BODY, old, secret, now=now - 10)["data"]["id"] == "c1"

    def test_missing_headers_and_other_versions(self):
        secret = new_secret()
        headers = self.fresh(secret)
        with pytest.raises(WebhookVerificationError, match="missing header"):
            verify(BODY, {k: v for k, v in headers.items() if k != "webhook-signature"}, secret)
        v2 = {**headers, "webhook-signature": headers["webhook-signature"].replace("v1,", "v2,")}
        with pytest.raises(WebhookVerificationError, match="no signature matches"):
            verify(BODY, v2, secret)
        with pytest.raises(WebhookVerificationError, match="whole seconds"):
            verify(BODY, {**headers, "webhook-timestamp": "soon"}, secret)
