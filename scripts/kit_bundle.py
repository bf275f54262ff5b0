"""Bundle a wheel's native libraries into it, so that it loads on a machine without them (the GPU check kit).

``scripts/gpu_kit.sh`` builds FFCV here against Debian's OpenCV and libjpeg-turbo; the GPU machine's image has
neither (only opencv-python-headless, whose OpenCV is linked into cv2 itself) and no apt. This copies every shared
library the wheel's extension and the extra ELF files need, except glibc's and the C++ runtime's (present wherever
torch runs), into ``<package>.libs/`` inside the wheel, points the RPATHs there (patchelf), retags the wheel
``manylinux_2_<N>`` for the newest glibc symbol version any of it needs, and writes what it did as JSON.
auditwheel does the same but leaves out the X11 and GL libraries OpenCV's core links, as "system" libraries:
a headless GPU image need not have them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

# Present on any Linux that runs torch: glibc's libraries and the C++ runtime (the image's own are newer).
SYSTEM = {"ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0",
          "libgcc_s.so.1", "libstdc++.so.6", "linux-vdso.so.1"}


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def dependencies(elf: str) -> dict:
    """soname -> resolved path of every library ``elf`` loads, transitively (ldd), without the system ones."""
    found = {}
    for line in run("ldd", elf).splitlines():
        match = re.match(r"\s*(\S+) => (\S+)", line)
        if match and match.group(1) not in SYSTEM:
            if match.group(2) == "not":
                raise SystemExit(f"{elf}: {match.group(1)} not found here; install it before building the kit")
            found[match.group(1)] = os.path.realpath(match.group(2))
    return found


def symbol_versions(elf: str, prefix: str) -> list:
    versions = set(re.findall(rf"\b{prefix}_([0-9][0-9.]*)\b", run("objdump", "-T", elf)))
    return sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def newest(versions) -> str:
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")), default="0")


def bundle(wheel: str, out_dir: str, extras: list, patchelf: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        tree = os.path.join(work, "tree")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tree)
        extensions = [os.path.join(root, name) for root, _, names in os.walk(tree) for name in names
                      if name.endswith(".so")]
        if not extensions:
            raise SystemExit(f"{wheel}: no extension to bundle for")
        package = os.path.relpath(extensions[0], tree).split(os.sep)[0]
        libs_dir = os.path.join(tree, f"{package}.libs")
        os.makedirs(libs_dir, exist_ok=True)
        needed = {}
        for elf in extensions + extras:
            needed.update(dependencies(elf))
        copied = []
        for soname, path in sorted(needed.items()):
            target = os.path.join(libs_dir, soname)
            shutil.copyfile(path, target)
            os.chmod(target, 0o755)
            run(patchelf, "--set-rpath", "$ORIGIN", target)
            copied.append(target)
        for extra in extras:
            target = os.path.join(libs_dir, os.path.basename(extra))
            shutil.copyfile(extra, target)
            run(patchelf, "--set-rpath", "$ORIGIN", target)
            copied.append(target)
        for extension in extensions:
            relative = os.path.relpath(libs_dir, os.path.dirname(extension))
            run(patchelf, "--set-rpath", f"$ORIGIN/{relative}", extension)
        # The tag: the newest glibc any file needs; pip on the GPU machine refuses the wheel on an older one.
        elves = extensions + copied
        glibc = newest(v for elf in elves for v in symbol_versions(elf, "GLIBC"))
        glibcxx = newest(v for elf in elves for v in symbol_versions(elf, "GLIBCXX"))
        major, minor = glibc.split(".")[:2]
        platform = f"manylinux_{major}_{minor}_x86_64"
        info_dir = next(d for d in os.listdir(tree) if d.endswith(".dist-info"))
        wheel_file = os.path.join(tree, info_dir, "WHEEL")
        text = open(wheel_file).read()
        text = re.sub(r"^(Tag: \S+-\S+-)linux_x86_64$", rf"\g<1>{platform}", text, flags=re.M)
        open(wheel_file, "w").write(text)
        os.makedirs(out_dir, exist_ok=True)
        before = set(os.listdir(out_dir))
        subprocess.run([sys.executable, "-m", "wheel", "pack", tree, "-d", out_dir], check=True,
                       capture_output=True)
        built = sorted(set(os.listdir(out_dir)) - before)
        return {"wheel": built[0] if built else None, "package": package, "platform": platform,
                "needs_glibc": glibc, "needs_glibcxx": glibcxx,
                "bundled": {os.path.basename(p): os.path.getsize(p) for p in copied}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--extra", action="append", default=[], help="another ELF file to bundle (with its libs)")
    parser.add_argument("--patchelf", default=shutil.which("patchelf") or "patchelf")
    parser.add_argument("--report", required=True, help="JSON file to write what was bundled into")
    args = parser.parse_args(argv)
    report = bundle(args.wheel, args.out_dir, args.extra, args.patchelf)
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "bundled"}))


if __name__ == "__main__":
    main()
