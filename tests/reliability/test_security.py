"""Security: ACL user, TLS, and no secret in logs, --help, --dry_run or dead letters."""

from __future__ import annotations

import pytest

from tests.reliability import security

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_acl_user_limited_to_the_sink_and_wrong_credentials(ctx):
    counts = security.acl_user(ctx)
    assert counts["results"] == counts["distinct_tweets"] and counts["lost"] == 0, counts
    assert counts["doubled"] == 0 and counts["dead_letters_parse"] == 2, counts
    assert counts["wrong_credentials_exit"] == [2, 2] and counts["names_flag"], counts
    assert "authentication failed" in counts["wrong_credentials_message"][0], counts
    assert counts["denied"] == ["GET", "FLUSHALL", "KEYS", "CONFIG", "DEL"], counts
    assert counts["secret_leaks"] == 0, counts


@pytest.mark.timeout(300)
def test_rediss_with_a_test_certificate(ctx):
    counts = security.tls(ctx)
    assert counts["results"] == counts["distinct_tweets"] and counts["lost"] == 0, counts
    assert counts["doubled"] == 0 and counts["dead_letters"] == 2, counts
    # Without the CA: stopped at start, and no plaintext stand-in took the results.
    assert counts["without_ca_exit"] == 2, counts
    assert "CERTIFICATE_VERIFY_FAILED" in counts["without_ca_message"][0], counts
    assert not counts["without_ca_started_own_redis"], counts


@pytest.mark.timeout(600)
def test_no_secret_in_help_or_dry_run_output(ctx):
    found = security.no_secrets_in_output(ctx)
    if "launcher flink --dry_run" not in found["checked"]:
        pytest.skip("no launcher/ in this checkout: the --dry_run part is skipped")
    assert not found["failed"], found
    assert not found["leaks"], found
