"""SA files: validation with errors naming file and field, keys never shown; the CLI verbs."""

import json
from pathlib import Path

import pytest
import yaml

from microseg.cli import main
from microseg.errors import InputError
from microseg.ipsec.sa import load_config, parse_config

V = Path(__file__).parent / "vectors" / "ipsec"
KEY = "2291d8cdc310411e7ec27378a661c935"
GOOD = {"spi": 0x1234, "key": KEY, "salt": "187c07e4", "tunnel_src": "192.0.2.1", "tunnel_dst": "192.0.2.2"}


def test_vectors_file_is_a_valid_sa_file():
    cfg = load_config(V / "vectors.json")
    assert [s.name for s in cfg.sas] == ["sa0", "sa1", "sa2"]
    assert [s.aead for s in cfg.sas] == ["AES-GCM-128", "AES-GCM-256", "AES-GCM-128"]
    assert cfg.sas[2].ip_version == 6 and cfg.policies == ()


def test_repr_and_summary_hide_keys():
    sa = parse_config({"sas": [GOOD]}).sas[0]
    for text in (repr(sa), str(sa), json.dumps(sa.summary()), repr(parse_config({"sas": [GOOD]}))):
        assert KEY not in text and "187c07e4" not in text
    assert "hidden" in repr(sa)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"spi": 7}, "spi"),
        ({"spi": "zz"}, "spi"),
        ({"spi": 2**32}, "spi"),
        ({"key": KEY[:-2]}, "key"),
        ({"key": "xyz" + KEY}, "key"),
        ({"key": 5}, "key"),
        ({"salt": "0102"}, "salt"),
        ({"tunnel_src": "300.1.1.1"}, "tunnel_src"),
        ({"tunnel_dst": "2001:db8::1"}, "tunnel_src and tunnel_dst"),
        ({"esn": "yes"}, "esn"),
        ({"replay_window": 5000}, "replay_window"),
        ({"replay_window": 0, "esn": True}, "replay_window"),
        ({"lifetime_bytes": -1}, "lifetime_bytes"),
        ({"name": ""}, "name"),
        ({"lifetime": 5}, "lifetime"),
        ({"lifetime": {"soft_byte": 5}}, "lifetime.soft_byte"),
        ({"lifetime": {"hard_packets": -1}}, "lifetime.hard_packets"),
        ({"lifetime": {"hard_packets": True}}, "lifetime.hard_packets"),
        ({"lifetime": {"hard_seconds": "1h"}}, "lifetime.hard_seconds"),
        ({"lifetime": {"hard_seconds": float("nan")}}, "lifetime.hard_seconds"),
        ({"lifetime": {"soft_seconds": -1}}, "lifetime.soft_seconds"),
        ({"lifetime": {"soft_bytes": 10, "hard_bytes": 10}}, "lifetime.soft_bytes"),
        ({"lifetime": {"soft_packets": 11, "hard_packets": 10}}, "must be below hard_packets"),
        ({"lifetime": {"hard_bytes": 10}, "lifetime_bytes": 10}, "not both"),
        ({"esn_resync": {"after": 3}}, "needs esn"),
        ({"esn": True, "esn_resync": 3}, "esn_resync"),
        ({"esn": True, "esn_resync": {"after": 0}}, "esn_resync.after"),
        ({"esn": True, "esn_resync": {"after": 2, "tries": 17}}, "esn_resync.tries"),
        ({"esn": True, "esn_resync": {"tries": 2}}, "missing field 'after'"),
        ({"esn": True, "esn_resync": {"after": 2, "retries": 2}}, "esn_resync.retries"),
    ],
)
def test_bad_fields_are_named_and_keys_not_echoed(change, field):
    with pytest.raises(InputError) as exc:
        parse_config({"sas": [dict(GOOD, **change)]}, path="sa.yaml")
    msg = str(exc.value)
    assert msg.startswith("sa.yaml: ") and field in msg
    assert KEY[:-2] not in msg and "xyz" not in msg


@pytest.mark.parametrize(
    "doc, text",
    [
        ([], "mapping"),
        ({}, "sas"),
        ({"sas": []}, "non-empty"),
        ({"sas": [dict(GOOD, name="a"), dict(GOOD, name="a", spi=5000)]}, "duplicate"),
        ({"sas": [GOOD, dict(GOOD, name="b")]}, "already used"),
        ({"sas": [dict(GOOD)], "policies": [{"dst": "10.0.0.0/8", "sa": "nope"}]}, "no SA named"),
        ({"sas": [dict(GOOD)], "policies": [{"dst": "10.0.0.0/33", "sa": "sa0"}]}, "prefix"),
        ({"sas": [dict(GOOD)], "policies": [{"dst": "10.0.0.0/8", "action": "maybe"}]}, "action"),
        ({"sas": [dict(GOOD)], "policies": [{"src": "::/0", "dst": "10.0.0.0/8", "sa": "sa0"}]}, "versions"),
        ({"sas": [dict(GOOD, missing=1, spi=None)]}, "spi"),
    ],
)
def test_bad_documents(doc, text):
    with pytest.raises(InputError, match=text):
        parse_config(doc, path="x.json")


def test_missing_field_named():
    bad = dict(GOOD)
    del bad["salt"]
    with pytest.raises(InputError, match=r"sas\[0\]: missing field 'salt'"):
        parse_config({"sas": [bad]})


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "sa.yaml"
    y.write_text(
        yaml.safe_dump(
            {
                "sas": [dict(GOOD, name="a", esn=True, replay_window=128, lifetime_packets=10)],
                "policies": [
                    {"src": "10.1.0.0/16", "dst": "10.2.0.0/16", "proto": "tcp", "sa": "a"},
                    {"dst": "10.3.0.0/16", "action": "bypass"},
                ],
            }
        )
    )
    cfg = load_config(y)
    assert cfg.sas[0].esn and cfg.sas[0].replay_window == 128 and len(cfg.policies) == 2
    assert cfg.policies[0].proto == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text("sas: [\n  {spi: 1,\n")
    with pytest.raises(InputError, match="bad.yaml:.*not valid YAML"):
        load_config(bad)
    badj = tmp_path / "bad.json"
    badj.write_text('{"sas": [')
    with pytest.raises(InputError, match="bad.json:1: not valid JSON"):
        load_config(badj)
    with pytest.raises(InputError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_cli_sa_list_never_prints_keys(capsys):
    assert main(["ipsec", "sa", "list", "--sa", str(V / "vectors.json")]) == 0
    out = capsys.readouterr().out
    doc = json.loads((V / "vectors.json").read_text())
    assert "sa0" in out and "0x0d5f4c3b" in out and "AES-GCM-256" in out
    for sa in doc["sas"]:
        assert sa["key"] not in out and sa["salt"] not in out
    assert main(["ipsec", "sa", "list", "--json", "--sa", str(V / "vectors.json")]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["spi"] for s in listed["sas"]] == [s["spi"] for s in doc["sas"]]
    assert "key" not in listed["sas"][0] and "salt" not in listed["sas"][0]


def test_cli_bad_sa_file_is_one_line(tmp_path, capsys):
    p = tmp_path / "sa.yaml"
    p.write_text(yaml.safe_dump({"sas": [dict(GOOD, key=KEY[:10])]}))
    assert main(["ipsec", "sa", "list", "--sa", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key" in err and KEY[:10] not in err


def test_cli_decrypt_encrypt_roundtrip(tmp_path, capsys):
    from microseg.io.pcap import read_capture

    sa = str(V / "vectors.json")
    dec = tmp_path / "dec.pcap"
    assert main(["ipsec", "decrypt", "--sa", sa, str(V / "esp.pcap"), "-w", str(dec)]) == 0
    inner = read_capture(dec)
    vec = json.loads((V / "vectors.json").read_text())
    assert [p[14:].hex() for p in inner.packets()] == [p["inner_hex"] for p in vec["packets"]]
    assert main(["ipsec", "encrypt", "--sa", sa, str(dec), "-w", str(tmp_path / "e.pcap")]) == 2
    assert "--use" in capsys.readouterr().err
    enc = tmp_path / "enc.pcap"
    assert main(["ipsec", "encrypt", "--sa", sa, "--use", "sa1", str(dec), "-w", str(enc)]) == 0
    back = tmp_path / "back.pcap"
    assert main(["ipsec", "decrypt", "--json", "--sa", sa, str(enc), "-w", str(back)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packets_out"] == 36 and report["dropped"] == {}
    assert list(read_capture(back).packets()) == list(inner.packets())
    # the negative capture alone: the replayed frame is new to a fresh gateway
    assert (
        main(
            [
                "ipsec",
                "decrypt",
                "--json",
                "--sa",
                sa,
                str(V / "esp_negative.pcap"),
                "-w",
                str(tmp_path / "neg.pcap"),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["packets_out"] == 1
    assert report["dropped"] == {"bad_icv": 1, "unknown_spi": 1, "malformed": 1}
    # after esp.pcap on the same gateway: the tampered frame is left of the window by then,
    # and the replay check comes before the ICV (RFC 4303 3.4.3)
    assert (
        main(
            [
                "ipsec",
                "decrypt",
                "--json",
                "--sa",
                sa,
                str(V / "esp.pcap"),
                str(V / "esp_negative.pcap"),
                "-w",
                str(tmp_path / "all.pcap"),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["packets_in"] == 40 and report["packets_out"] == 36
    assert report["dropped"] == {"replay": 2, "unknown_spi": 1, "malformed": 1}
    assert (
        main(["ipsec", "encrypt", "--sa", sa, "--use", "nope", str(dec), "-w", str(tmp_path / "x.pcap")]) == 2
    )


def test_cli_missing_input_creates_no_output(tmp_path, capsys):
    out = tmp_path / "o.pcap"
    assert (
        main(
            ["ipsec", "decrypt", "--sa", str(V / "vectors.json"), str(tmp_path / "none.pcap"), "-w", str(out)]
        )
        == 2
    )
    assert "no such capture file" in capsys.readouterr().err and not out.exists()


def test_cli_reports_never_contain_key_material(tmp_path, capsys):
    doc = json.loads((V / "vectors.json").read_text())
    sa = str(V / "vectors.json")
    out = tmp_path / "o.pcap"
    texts = []
    for argv in (
        ["ipsec", "decrypt", "--sa", sa, str(V / "esp.pcap"), "-w", str(out)],
        ["ipsec", "decrypt", "--json", "--sa", sa, str(V / "esp_negative.pcap"), "-w", str(out)],
        ["ipsec", "encrypt", "--json", "--use", "sa2", "--sa", sa, str(V / "esp.pcap"), "-w", str(out)],
    ):
        assert main(argv) == 0
        cap = capsys.readouterr()
        texts.append(cap.out + cap.err)
    blob = "\n".join(texts).lower()
    assert "packets" in blob
    for s in doc["sas"]:
        assert s["key"] not in blob and s["salt"] not in blob


def test_lifetimes_parsed_with_the_older_keys_as_hard_limits():
    sa = parse_config(
        {
            "sas": [
                dict(
                    GOOD,
                    lifetime={"soft_bytes": 1000, "hard_seconds": 90.5, "soft_seconds": 60},
                    lifetime_packets=7,
                )
            ]
        }
    ).sas[0]
    assert sa.lifetime() == {
        "soft_bytes": 1000,
        "hard_bytes": 0,
        "soft_packets": 0,
        "hard_packets": 7,
        "soft_seconds": 60,
        "hard_seconds": 90.5,
    }
    assert sa.lifetime_packets == 7 and sa.resync_after == 0
    sa = parse_config({"sas": [dict(GOOD, esn=True, esn_resync={"after": 4, "tries": 3})]}).sas[0]
    assert (sa.resync_after, sa.resync_tries) == (4, 3)
    assert sa.summary()["esn_resync"] == {"after": 4, "tries": 3}


def test_yaml_errors_name_the_line(tmp_path):
    text = """sas:
  - name: a
    spi: 0x1234
    key: 2291d8cdc310411e7ec27378a661c935
    salt: 187c07e4
    tunnel_src: 192.0.2.1
    tunnel_dst: 192.0.2.2
    lifetime:
      soft_bytes: 2000
      hard_bytes: 1000
"""
    p = tmp_path / "sa.yaml"
    p.write_text(text)
    with pytest.raises(
        InputError,
        match=r"sa.yaml:9: sas\[0\] \(a\).lifetime.soft_bytes: 2000 "
        r"must be below hard_bytes",
    ):
        load_config(p)
    p.write_text(text.replace("soft_bytes: 2000", "soft_bytez: 2000"))
    with pytest.raises(InputError, match=r"sa.yaml:9: .*lifetime.soft_bytez: unknown limit"):
        load_config(p)
    p.write_text(text.replace("salt: 187c07e4", "salt: 187c"))
    with pytest.raises(InputError, match=r"sa.yaml:5: .*salt: expected 4 bytes, got 2"):
        load_config(p)
    p.write_text(
        text.replace("soft_bytes: 2000", "soft_bytes: 200") + "policies:\n  - {dst: 10.0.0.0/8, sa: b}\n"
    )
    with pytest.raises(InputError, match=r"sa.yaml:12: policies\[0\].sa: no SA named 'b'"):
        load_config(p)
    p.write_text(text.replace("soft_bytes: 2000", "soft_bytes: 200"))
    assert load_config(p).sas[0].soft_bytes == 200


def test_cli_sa_list_shows_lifetimes(tmp_path, capsys):
    p = tmp_path / "sa.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "sas": [
                    dict(
                        GOOD,
                        esn=True,
                        esn_resync={"after": 8},
                        lifetime={
                            "soft_bytes": 1000000,
                            "hard_bytes": 1500000,
                            "soft_packets": 900,
                            "hard_packets": 1000,
                            "soft_seconds": 3600,
                            "hard_seconds": 3900,
                        },
                    )
                ]
            }
        )
    )
    assert main(["ipsec", "sa", "list", "--sa", str(p)]) == 0
    out = capsys.readouterr().out
    assert "1M/1.5M" in out and "900/1k" in out and "3600/3900" in out
    assert "re-synchronisation after 8" in out
    assert KEY not in out and "187c07e4" not in out
    assert main(["ipsec", "sa", "list", "--json", "--sa", str(p)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sas"][0]["lifetime"]["hard_packets"] == 1000
    assert doc["sas"][0]["esn_resync"] == {"after": 8, "tries": 1}
    assert KEY not in json.dumps(doc)
