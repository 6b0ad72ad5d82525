"""The test image: a one-file rootfs with a static busybox, made locally with ``docker import``.

No registry is reachable from the test machines, so nothing is ever pulled. This module is also
run as a script by ``scripts/test`` (``python tests/support/images.py [--check-busybox]``), so it
imports only the standard library and the docker SDK.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import tarfile

import docker
import docker.errors

BUSYBOX_IMAGE = "labelgw-test-busybox"
# Bumped whenever the rootfs changes: an image without this exact marker is rebuilt. It is an ENV
# entry rather than a label so that containers do not inherit an extra label.
IMAGE_REVISION = "LGWTEST_IMAGE_REVISION=busybox-2"
APPLETS = ("sh", "httpd", "nc", "sleep", "cat", "echo", "wget", "mkdir", "ls", "kill")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class BusyboxUnavailable(RuntimeError):
    """No statically linked busybox on this machine (Debian package: busybox-static)."""


def _is_static_elf(path: str) -> bool:
    """True when the ELF file has no PT_INTERP header, i.e. needs no dynamic loader."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # only 64-bit ELF is expected here
            return False
        endian = "<" if header[5] == 1 else ">"
        (phoff,) = struct.unpack_from(endian + "Q", header, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(
        struct.unpack_from(endian + "I", table, i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def find_static_busybox() -> str:
    for path in BUSYBOX_CANDIDATES:
        if os.path.isfile(path) and _is_static_elf(path):
            return path
    raise BusyboxUnavailable(
        "no static busybox found (looked at %s); install it: apt-get install busybox-static"
        % ", ".join(BUSYBOX_CANDIDATES)
    )


def busybox_rootfs_tar(busybox_path: str) -> bytes:
    """A tar of /bin/busybox, applet symlinks, an empty /www and a world-writable /tmp."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("www", 0o755), ("tmp", 0o1777)):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)
        with open(busybox_path, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    return buffer.getvalue()


def image_is_current(client: docker.DockerClient, name: str = BUSYBOX_IMAGE) -> bool:
    try:
        image = client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    env = (image.attrs.get("Config") or {}).get("Env") or []
    return IMAGE_REVISION in env


def ensure_busybox_image(client: docker.DockerClient, name: str = BUSYBOX_IMAGE) -> bool:
    """Build the image unless a current one exists. Returns True when it was (re)built."""
    if image_is_current(client, name):
        return False
    rootfs = busybox_rootfs_tar(find_static_busybox())
    client.api.import_image_from_data(
        rootfs, repository=name, tag="latest", changes=[f"ENV {IMAGE_REVISION}"]
    )
    if not image_is_current(client, name):
        raise RuntimeError(f"docker import of {name} did not produce the expected image")
    return True


def main(argv: list[str]) -> int:
    if argv == ["--check-busybox"]:
        try:
            print(find_static_busybox())
        except BusyboxUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    client = docker.from_env(timeout=60)
    try:
        built = ensure_busybox_image(client)
    except BusyboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"{BUSYBOX_IMAGE}: {'built' if built else 'already present'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
