#!/usr/bin/env bash
# Download the published CIFAR-100 teachers (RepDistiller's) into
# ${DEST}/<name>_vanilla/ckpt_epoch_240.pth, where run_cifar_distill.sh looks for them. Each file is
# downloaded to a temporary file, its SHA-256 checked against the manifest, and only then moved
# into place: a file whose checksum is wrong, or unknown, is not installed.
#
#   bash scripts/fetch_pretrained_teachers.sh
#   NAMES="resnet32x4 vgg13" bash scripts/fetch_pretrained_teachers.sh
#   BASE_URL=file:///mnt/mirror bash scripts/fetch_pretrained_teachers.sh   # a mirror or a local copy
#
# Environment:
#   NAMES       teachers to fetch (default: wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50)
#   BASE_URL    where they are: ${BASE_URL}/<name>_vanilla/ckpt_epoch_240.pth
#               (default http://shape2prog.csail.mit.edu/repo, RepDistiller's; file:// URLs work)
#   DEST        where to install them (default ./save/models; SAVE_DIR is accepted too)
#   CHECKSUMS   the manifest, `sha256sum -c` format (default scripts/teachers.sha256)
#   ALLOW_UNVERIFIED=1  install files the manifest has no checksum for, and print the line to add
#   FORCE=1     download again even if a file is already installed
# Relative paths are relative to the repository's root. An installed file that verifies is
# skipped; one that does not match (e.g. your own teacher, which run_cifar_vanilla.sh links there)
# is left alone. Needs curl (or wget, or neither for file:// URLs) and sha256sum (or shasum).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "${ALLOW_UNVERIFIED:-0}" != 0 ] || ALLOW_UNVERIFIED=""; [ "${FORCE:-0}" != 0 ] || FORCE=""  # 0 or unset: off
NAMES=${NAMES:-"wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50"}
BASE_URL=${BASE_URL:-http://shape2prog.csail.mit.edu/repo}
BASE_URL=${BASE_URL%/}
DEST=${DEST:-${SAVE_DIR:-./save/models}}
CHECKSUMS=${CHECKSUMS:-scripts/teachers.sha256}

[ -f "$CHECKSUMS" ] || { echo "error: checksum manifest '$CHECKSUMS' not found (CHECKSUMS=<file> gives another)" >&2; exit 2; }

sha256_of() {
  if command -v sha256sum > /dev/null; then sha256sum "$1" | cut -d ' ' -f 1
  elif command -v shasum > /dev/null; then shasum -a 256 "$1" | cut -d ' ' -f 1
  else python3 -c 'import hashlib, sys; print(hashlib.file_digest(open(sys.argv[1], "rb"), "sha256").hexdigest())' "$1"
  fi
}
expected_sha256() {  # the manifest's checksum of the relative path $1 (empty if none)
  awk -v f="$1" 'length($1) == 64 && $1 ~ /^[0-9a-fA-F]+$/ && ($2 == f || $2 == "*" f) { print tolower($1); exit }' "$CHECKSUMS"
}
download() {  # url, output file
  if command -v curl > /dev/null; then curl -fsSL --retry 2 --connect-timeout 30 -o "$2" "$1"
  elif [[ "$1" == file://* ]]; then cp -- "${1#file://}" "$2"
  elif command -v wget > /dev/null; then wget -q -O "$2" "$1"
  else echo "error: neither curl nor wget is installed" >&2; return 127
  fi
}
looks_like_checkpoint() {  # a zip (torch.save since 1.6) or a pickle (older torch.save), not e.g. an HTML page
  local magic
  magic=$(head -c 2 "$1" | od -An -tx1 | tr -d ' \n')
  [ "$magic" = 504b ] || [ "${magic:0:2}" = 80 ]
}

TMP=""
trap '[ -z "$TMP" ] || rm -f "$TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
failed=0
for name in $NAMES; do
  if [[ ! "$name" =~ ^[A-Za-z0-9_]+$ ]]; then echo "error: '$name' is not a model name" >&2; failed=$((failed + 1)); continue; fi
  rel="${name}_vanilla/ckpt_epoch_240.pth"
  dest="$DEST/$rel" url="$BASE_URL/$rel"
  expected=$(expected_sha256 "$rel")

  if [ -z "${FORCE:-}" ] && { [ -e "$dest" ] || [ -L "$dest" ]; }; then
    if [ -z "$expected" ]; then
      echo "skip $name: $dest is already there (not verified: $CHECKSUMS has no checksum for $rel)"
    elif [ "$(sha256_of "$dest")" = "$expected" ]; then
      echo "skip $name: $dest is already there and verified"
    else
      echo "skip $name: $dest is already there but is not the published file (your own teacher?); left alone: remove it or set FORCE=1 to replace it"
    fi
    continue
  fi
  if [ -z "$expected" ] && [ -z "${ALLOW_UNVERIFIED:-}" ]; then
    echo "error: no checksum for $rel in $CHECKSUMS, so $name is not fetched. Either add its line to the" >&2
    echo "  manifest (or give your own with CHECKSUMS=<file>), or run with ALLOW_UNVERIFIED=1 to install it" >&2
    echo "  unverified and print the line to add." >&2
    failed=$((failed + 1)); continue
  fi

  mkdir -p "$DEST"
  TMP=$(mktemp "$DEST/.${name}_ckpt_epoch_240.pth.XXXXXX")
  echo "fetching $url"
  status=0
  download "$url" "$TMP" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "error: could not download $url (exit status $status); $name not installed. If the server is down or" >&2
    echo "  the file moved, set BASE_URL to a mirror holding <name>_vanilla/ckpt_epoch_240.pth (file:///path for a" >&2
    echo "  local copy), or train the teacher: TEACHERS=$name STUDENTS= bash scripts/run_cifar_vanilla.sh" >&2
    rm -f "$TMP"; TMP=""; failed=$((failed + 1)); continue
  fi
  actual=$(sha256_of "$TMP")
  if [ -n "$expected" ] && [ "$actual" != "$expected" ]; then
    echo "error: checksum mismatch for $url: its SHA-256 is $actual but $CHECKSUMS says $expected;" >&2
    echo "  $name not installed (a corrupt or different file: retry, or check the mirror)" >&2
    rm -f "$TMP"; TMP=""; failed=$((failed + 1)); continue
  fi
  if [ -z "$expected" ] && ! looks_like_checkpoint "$TMP"; then
    echo "error: $url is not a PyTorch checkpoint (an error page?); $name not installed" >&2
    rm -f "$TMP"; TMP=""; failed=$((failed + 1)); continue
  fi
  chmod 644 "$TMP"
  mkdir -p "$(dirname "$dest")"
  mv -f "$TMP" "$dest"; TMP=""
  if [ -n "$expected" ]; then
    echo "installed $dest (SHA-256 verified)"
  else
    echo "installed $dest UNVERIFIED; once you trust it, add this line to $CHECKSUMS:"
    echo "$actual  $rel"
  fi
done
if [ "$failed" -gt 0 ]; then echo "$failed teacher(s) not installed (see the errors above)" >&2; exit 1; fi
