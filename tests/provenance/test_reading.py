"""Provenance read from real files made here: C2PA credentials (valid, tampered, untrusted, remote), XMP and
EXIF, each giving its documented record and policy outcome, with no network access while reading."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path
from typing import Any

import c2pa
import pytest

from tests.provenance import credentials as cr
from worker.media.provenance import ProvenanceReader, c2pa_settings
from worker.records import CredentialState, Provenance, Verdict
from worker.scoring.policy import DECLARED_AI, provenance_verdict
from worker.settings import Settings


def reader(tmp_path: Path, trust_file: Path | None = None, **kw: Any) -> ProvenanceReader:
    return ProvenanceReader(Settings(home=tmp_path / "home", provenance_trust_anchors=trust_file, **kw))


def test_valid_credential_from_a_trusted_signer_that_declares_ai_is_proof(
    tmp_path: Path, trust_file: Path, trusted_chain: cr.Chain, no_network: list[Any]
) -> None:
    signed = cr.sign(cr.photo(), trusted_chain)
    prov = reader(tmp_path, trust_file).read(signed)
    assert prov.credential == CredentialState.TRUSTED
    assert prov.validation_state == "Trusted"
    assert prov.validation_failures == []
    assert prov.signer == "Trusted Generator Inc Signer"
    assert prov.signer_org == "Trusted Generator Inc"
    assert prov.claim_generator == "TestGen/2.1"
    assert prov.credential_source_type == "trainedAlgorithmicMedia"
    assert prov.declared_ai and prov.proven_ai
    assert provenance_verdict(Verdict.ALLOW, prov, "block") == (Verdict.BLOCK, DECLARED_AI)
    assert provenance_verdict(Verdict.ALLOW, prov, "review") == (Verdict.REVIEW, DECLARED_AI)
    assert provenance_verdict(Verdict.ALLOW, prov, "off") == (Verdict.ALLOW, None)
    assert provenance_verdict(Verdict.BLOCK, prov, "review") == (Verdict.BLOCK, None)  # never lowers
    assert no_network == []


def test_trusted_camera_credential_is_recorded_but_not_ai(
    tmp_path: Path, trust_file: Path, trusted_chain: cr.Chain, no_network: list[Any]
) -> None:
    prov = reader(tmp_path, trust_file).read(cr.sign(cr.photo(seed=1), trusted_chain, cr.CAPTURE))
    assert prov.credential == CredentialState.TRUSTED
    assert prov.credential_source_type == "digitalCapture"
    assert not prov.declared_ai and not prov.proven_ai
    assert provenance_verdict(Verdict.REVIEW, prov, "block") == (Verdict.REVIEW, None)


def test_credential_tampered_after_signing_is_invalid_and_never_proof(
    tmp_path: Path, trust_file: Path, trusted_chain: cr.Chain, no_network: list[Any]
) -> None:
    tampered = cr.tamper(cr.sign(cr.photo(seed=2), trusted_chain))
    prov = reader(tmp_path, trust_file).read(tampered)
    assert prov.credential == CredentialState.INVALID
    assert prov.validation_state == "Invalid"
    assert "assertion.dataHash.mismatch" in prov.validation_failures
    assert prov.signer == "Trusted Generator Inc Signer"  # what the manifest claims, kept for the record
    assert prov.declared_ai and not prov.proven_ai
    assert provenance_verdict(Verdict.ALLOW, prov, "block") == (Verdict.ALLOW, None)
    assert no_network == []


def test_credential_signed_by_an_untrusted_key_is_recorded_but_never_proof(
    tmp_path: Path, trust_file: Path, untrusted_chain: cr.Chain, no_network: list[Any]
) -> None:
    prov = reader(tmp_path, trust_file).read(cr.sign(cr.photo(seed=3), untrusted_chain))
    assert prov.credential == CredentialState.UNTRUSTED
    assert prov.validation_state == "Valid"  # signature and bindings verify; the signer is not on our list
    assert "signingCredential.untrusted" in prov.validation_failures
    assert prov.signer_org == "Unknown Signer Ltd"
    assert prov.declared_ai and not prov.proven_ai
    assert provenance_verdict(Verdict.ALLOW, prov, "block") == (Verdict.ALLOW, None)
    assert no_network == []


def test_without_a_configured_trust_list_no_credential_is_trusted(
    tmp_path: Path, trusted_chain: cr.Chain, no_network: list[Any]
) -> None:
    prov = reader(tmp_path).read(cr.sign(cr.photo(seed=4), trusted_chain))
    assert prov.credential == CredentialState.UNTRUSTED
    assert not prov.proven_ai


def test_xmp_digital_source_type_annotates_only(tmp_path: Path, no_network: list[Any]) -> None:
    # A non-conventional prefix: the namespace decides, not the prefix.
    data = cr.with_xmp(cr.photo(seed=5), cr.xmp_packet(cr.AI, prefix="ext"))
    prov = reader(tmp_path).read(data)
    assert prov == Provenance(xmp_source_type="trainedAlgorithmicMedia", declared_ai=True)
    assert provenance_verdict(Verdict.ALLOW, prov, "block") == (Verdict.ALLOW, None)
    assert no_network == []


def test_xmp_element_form_is_read(tmp_path: Path) -> None:
    packet = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
        b"<Iptc4xmpExt:DigitalSourceType>" + cr.AI.encode() + b"</Iptc4xmpExt:DigitalSourceType>"
        b"</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    prov = reader(tmp_path).read(cr.with_xmp(cr.photo(seed=6), packet))
    assert prov.xmp_source_type == "trainedAlgorithmicMedia" and prov.declared_ai


def test_exif_from_a_camera_annotates_only(tmp_path: Path, no_network: list[Any]) -> None:
    prov = reader(tmp_path).read(cr.camera_jpeg())
    assert prov == Provenance(camera_make="Canon", camera_model="Canon EOS R5", software="Firmware 1.8.1")
    assert provenance_verdict(Verdict.REVIEW, prov, "block") == (Verdict.REVIEW, None)
    assert no_network == []


def test_plain_and_hostile_bytes_read_as_absent_without_raising(
    tmp_path: Path, no_network: list[Any]
) -> None:
    r = reader(tmp_path)
    assert r.read(cr.photo(seed=7)) == Provenance()
    for data in (b"", b"garbage" * 100, b"\xff\xd8\xff" + bytes(500), b"\x89PNG\r\n\x1a\n" + bytes(100)):
        prov = r.read(data)
        assert not prov.declared_ai and not prov.proven_ai
    assert no_network == []


class _Listener:
    """A local HTTP-less TCP server that counts connections: a native (Rust) fetch would show up here."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.close()

    def settle(self) -> int:
        """Connections seen, after a probe of our own has been accepted (so none is still in flight)."""
        probe = socket.create_connection(("127.0.0.1", self.port))
        probe.close()
        for _ in range(200):
            if self.hits >= 1:
                break
            threading.Event().wait(0.01)
        return self.hits - 1


def test_remote_manifest_is_never_fetched(tmp_path: Path, trusted_chain: cr.Chain, trust_file: Path) -> None:
    listener = _Listener()
    url = f"http://127.0.0.1:{listener.port}/manifest.c2pa"
    data = cr.sign(cr.photo(seed=8), trusted_chain, remote_url=url)
    prov = reader(tmp_path, trust_file).read(data)
    assert prov.credential == CredentialState.REMOTE
    assert prov.remote_manifest == url
    assert not prov.proven_ai
    assert listener.settle() == 0

    # The control: the same SDK told to fetch does reach the listener, so the check above can fail.
    control = c2pa_settings(Settings(home=tmp_path / "home"))
    control["verify"]["remote_manifest_fetch"] = True
    control["core"]["allowed_network_hosts"] = None
    listener2 = _Listener()
    url2 = f"http://127.0.0.1:{listener2.port}/manifest.c2pa"
    data2 = cr.sign(cr.photo(seed=8), trusted_chain, remote_url=url2)
    with pytest.raises(c2pa.C2paError):
        c2pa.Reader("image/jpeg", io.BytesIO(data2), context=c2pa.Context.from_dict(control))
    if listener2.settle() == 0:  # seen on hosts whose proxy settings keep the SDK's HTTP client off loopback
        pytest.skip("the C2PA SDK told to fetch did not reach the loopback listener: the control is moot")
