#!/usr/bin/env python3
"""Fetch Debian packages and their dependencies from one suite into a private root.

    debfetch.py ROOT SUITE [=]ARCH:PACKAGE... [--skip NAME...]

Every file is checked on the way: the suite's InRelease against the Debian archive
keyring (gpgv), each Packages index against the SHA256 that InRelease lists, each .deb
against the SHA256 its index lists. Packages are unpacked with `dpkg-deb -x`; nothing is
installed on the system. Dependencies are followed (first alternative; version
constraints are not checked: one suite is self-consistent), except for a package written
with a leading `=` and for names given with --skip, which the caller takes from the host.
"""
import hashlib
import lzma
import os
import re
import subprocess
import sys
import urllib.request

MIRROR = os.environ.get("UPDRAFT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def fail(msg):
    sys.exit(f"debfetch: {msg}")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.read()
    except Exception as e:  # noqa: BLE001 - one line for the operator
        fail(f"cannot download {url}: {e}")


def verified_release(root, suite):
    path = os.path.join(root, f"{suite}.InRelease")
    with open(path, "wb") as f:
        f.write(get(f"{MIRROR}/dists/{suite}/InRelease"))
    out = subprocess.run(
        ["gpgv", "--keyring", KEYRING, "--output", "-", path],
        capture_output=True,
    )
    if out.returncode != 0:
        fail(f"{suite}/InRelease: signature not valid against {KEYRING}: "
             + out.stderr.decode(errors="replace").strip().splitlines()[-1])
    return out.stdout.decode()


def sha256_from_release(release, name):
    in_sha = False
    for line in release.splitlines():
        if line.startswith("SHA256:"):
            in_sha = True
            continue
        if in_sha:
            if not line.startswith(" "):
                break
            digest, _size, file = line.split()
            if file == name:
                return digest
    fail(f"InRelease lists no SHA256 for {name}")


def index(release, suite, arch):
    name = f"main/binary-{arch}/Packages.xz"
    data = get(f"{MIRROR}/dists/{suite}/{name}")
    want = sha256_from_release(release, name)
    if hashlib.sha256(data).hexdigest() != want:
        fail(f"{suite}/{name}: SHA256 does not match InRelease (mirror in sync?)")
    packages = {}
    for stanza in lzma.decompress(data).decode().split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            packages[fields["Package"]] = fields
    return packages


def deps(fields):
    for field in ("Pre-Depends", "Depends"):
        for clause in filter(None, (c.strip() for c in fields.get(field, "").split(","))):
            first = clause.split("|")[0].strip()
            yield re.split(r"[\s(:]", first, maxsplit=1)[0]


def wanted_item(word):
    """`[=]ARCH:PACKAGE` as (arch, package, taken alone)."""
    arch, sep, name = word.lstrip("=").partition(":")
    if not (arch and sep and name):
        fail(f"'{word}': name a package as ARCH:PACKAGE, e.g. amd64:rustc-web")
    return arch, name, word.startswith("=")


def main():
    args = sys.argv[1:]
    skip = set()
    if "--skip" in args:
        i = args.index("--skip")
        skip = set(args[i + 1:])
        args = args[:i]
    if len(args) < 3:
        fail(__doc__.strip().splitlines()[2].strip())
    root, suite, wanted = args[0], args[1], args[2:]
    todo = [wanted_item(w) for w in wanted]
    os.makedirs(root, exist_ok=True)
    release = verified_release(root, suite)
    indexes = {}
    done = set()
    while todo:
        arch, name, alone = todo.pop()
        if (arch, name) in done or name in skip:
            continue
        done.add((arch, name))
        if arch not in indexes:
            indexes[arch] = index(release, suite, arch)
        fields = indexes[arch].get(name)
        if fields is None:
            fail(f"{suite} has no package {name} for {arch}")
        deb = get(f"{MIRROR}/{fields['Filename']}")
        if hashlib.sha256(deb).hexdigest() != fields["SHA256"]:
            fail(f"{fields['Filename']}: SHA256 does not match the {suite} index")
        path = os.path.join(root, os.path.basename(fields["Filename"]))
        with open(path, "wb") as f:
            f.write(deb)
        subprocess.run(["dpkg-deb", "-x", path, root], check=True)
        os.remove(path)
        print(f"{name}:{arch} {fields['Version']}", flush=True)
        if not alone:
            todo.extend((arch, d, False) for d in deps(fields))


main()
