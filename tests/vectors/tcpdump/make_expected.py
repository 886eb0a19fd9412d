"""Write expected_libpcap.json: what libpcap (through tcpdump) reads from each capture here.

For every file, `tcpdump --time-stamp-precision=nano -r FILE -w OUT` re-writes the packets as
libpcap delivers them, and this script reads OUT with its own few lines of pcap parsing (not
microseg's reader). Per file: the link type of the file (or of its first interface), the
snap length, each packet's timestamp (ns), captured and original length and the SHA-256 of
its bytes (first 16 hex digits), and the last line tcpdump printed if it failed.
Run it here with tcpdump on the PATH: `python make_expected.py`.
"""

import hashlib
import json
import os
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def read_pcap(path):
    data = open(path, "rb").read()
    magic = struct.unpack_from("<I", data)[0]
    e = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    magic, _, _, _, _, snaplen, network = struct.unpack_from(e + "IHHiIII", data)
    mult = 1 if magic == 0xA1B23C4D else 1000
    pos, out = 24, []
    while pos + 16 <= len(data):
        sec, frac, incl, orig = struct.unpack_from(e + "IIII", data, pos)
        pkt = data[pos + 16 : pos + 16 + incl]
        out.append([sec * 1_000_000_000 + frac * mult, incl, orig, hashlib.sha256(pkt).hexdigest()[:16]])
        pos += 16 + incl
    return network & 0xFFFF, snaplen, out


def main():
    expected = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(os.listdir(HERE)):
            if not name.endswith((".pcap", ".pcapng")):
                continue
            out = os.path.join(tmp, "out.pcap")
            p = subprocess.run(
                ["tcpdump", "--time-stamp-precision=nano", "-r", os.path.join(HERE, name), "-w", out],
                capture_output=True,
                text=True,
            )
            lt, snaplen, packets = read_pcap(out)
            err = p.stderr.strip().splitlines()[-1] if p.returncode else None
            expected[name] = {"linktype": lt, "snaplen": snaplen, "packets": packets, "libpcap_error": err}
    with open(os.path.join(HERE, "expected_libpcap.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
