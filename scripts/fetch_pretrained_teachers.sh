#!/usr/bin/env bash
# Download the published CIFAR-100 teachers (RepDistiller's) and install each as
# ${DEST}/<name>_vanilla/ckpt_epoch_240.pth, where run_cifar_distill.sh looks for them.
#
# Two sources of these files (SOURCE):
#   mdistiller    (default) the GitHub release archive of mdistiller (the DKD authors' code),
#                 cifar_teachers.tar, which holds cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth
#                 in RepDistiller's layout and format. It is downloaded once to a temporary file
#                 (a local path or file:// URL is read in place), its SHA-256 printed, and only the
#                 NAMES asked for are unpacked: exactly those member names, regular files only.
#   repdistiller  one file per teacher from ${BASE_URL}/<name>_vanilla/ckpt_epoch_240.pth:
#                 RepDistiller's own server (unreachable for years, hence not the default) or a mirror.
#
# Checksums: a file is installed only if verified against the manifest (CHECKSUMS), which may
# hold each teacher file's SHA-256 (`<sha256>  <name>_vanilla/ckpt_epoch_240.pth`) and the
# archive's (`<sha256>  cifar_teachers.tar`, whatever ARCHIVE_URL's file is called): a teacher verifies if its
# file's line matches, or if it came from an archive whose line matches. The shipped manifest has
# no checksum yet (it was written without network access), so every teacher is refused unless
# ALLOW_UNVERIFIED=1: then files are installed unverified and the lines to add are printed.
#
#   ALLOW_UNVERIFIED=1 bash scripts/fetch_pretrained_teachers.sh          # first time: prints the lines
#   bash scripts/fetch_pretrained_teachers.sh                             # `sh scripts/...` works too
#   NAMES="resnet32x4 vgg13" bash scripts/fetch_pretrained_teachers.sh
#   ARCHIVE_URL=/data/cifar_teachers.tar bash scripts/fetch_pretrained_teachers.sh   # a copy you have
#   SOURCE=repdistiller BASE_URL=file:///mnt/mirror bash scripts/fetch_pretrained_teachers.sh
#
# Environment:
#   NAMES        teachers to fetch (default: wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50)
#   SOURCE       mdistiller or repdistiller (default mdistiller; repdistiller when only BASE_URL is set)
#   ARCHIVE_URL  (mdistiller) the archive: an https:// or file:// URL or a local path (default
#                https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar)
#   BASE_URL     (repdistiller) where the files are (default http://shape2prog.csail.mit.edu/repo)
#   DEST         where to install them (default ./save/models; SAVE_DIR is accepted too)
#   CHECKSUMS    the manifest, `sha256sum -c` format (default scripts/teachers.sha256)
#   ALLOW_UNVERIFIED=1  install files the manifest cannot verify, and print the lines to add
#   FORCE=1      fetch again even if a file is already installed
#   PYTHON       the interpreter that reads the archive (default python3, else python)
# Relative paths are relative to the repository's root. An installed file that verifies is
# skipped; one that does not match (e.g. your own teacher, which run_cifar_vanilla.sh links there)
# is left alone. Each file is written to a temporary file in DEST and renamed into place: a
# destination that cannot be written (full disk, quota, no permission, read-only) stops the script
# with one line naming the file, the temporary file removed, so an installed teacher is only ever
# replaced by a complete one. Needs curl (or wget, or neither for local files) and sha256sum (or
# shasum, or Python).
if [ -z "${BASH_VERSION:-}" ]; then  # started as `sh scripts/...` (dash on Debian): rerun with bash
  command -v bash > /dev/null 2>&1 || { echo "error: $0 needs bash, which is not installed" >&2; exit 2; }
  exec bash "$0" "$@"
fi
set +o posix  # bash started as sh runs in POSIX mode: the rest is written for bash
set -euo pipefail
cd "$(dirname "$0")/.."

[ "${ALLOW_UNVERIFIED:-0}" != 0 ] || ALLOW_UNVERIFIED=""; [ "${FORCE:-0}" != 0 ] || FORCE=""  # 0 or unset: off
NAMES=${NAMES:-"wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50"}
if [ -z "${SOURCE:-}" ]; then
  if [ -n "${BASE_URL:-}" ] && [ -z "${ARCHIVE_URL:-}" ]; then SOURCE=repdistiller; else SOURCE=mdistiller; fi
fi
ARCHIVE_URL=${ARCHIVE_URL:-https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar}
BASE_URL=${BASE_URL:-http://shape2prog.csail.mit.edu/repo}
BASE_URL=${BASE_URL%/}
DEST=${DEST:-${SAVE_DIR:-./save/models}}
CHECKSUMS=${CHECKSUMS:-scripts/teachers.sha256}
ARCHIVE_ROOT=cifar_teachers  # the archive's top folder

case "$SOURCE" in
  mdistiller|repdistiller) ;;
  *) echo "error: SOURCE must be mdistiller or repdistiller, not '$SOURCE'" >&2; exit 2 ;;
esac
[ -f "$CHECKSUMS" ] || { echo "error: checksum manifest '$CHECKSUMS' not found (CHECKSUMS=<file> gives another)" >&2; exit 2; }

sha256_of() {
  if command -v sha256sum > /dev/null; then sha256sum "$1" | cut -d ' ' -f 1
  elif command -v shasum > /dev/null; then shasum -a 256 "$1" | cut -d ' ' -f 1
  else "$(python_cmd)" -c 'import hashlib, sys; print(hashlib.file_digest(open(sys.argv[1], "rb"), "sha256").hexdigest())' "$1"
  fi
}
python_cmd() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif command -v python3 > /dev/null; then echo python3
  else echo python
  fi
}
expected_sha256() {  # the manifest's checksum of the relative path $1 (empty if none)
  awk -v f="$1" 'length($1) == 64 && $1 ~ /^[0-9a-fA-F]+$/ && ($2 == f || $2 == "*" f) { print tolower($1); exit }' "$CHECKSUMS"
}
write_failed() {  # what could not be written, why: one line, and stop (the EXIT trap removes the temporaries)
  echo "error: could not write $1 ($2): is the disk full or the folder not writable? Free space or choose another destination (DEST=<folder>); no partial file was left" >&2
  exit 1
}
make_dest() {  # DEST exists, or one line and stop
  local err
  err=$(mkdir -p "$DEST" 2>&1) || write_failed "$DEST" "${err##*: }"
}
new_temp() {  # a new empty file in DEST named .$1.XXXXXX (its path on stdout), or one line and stop
  local out
  make_dest
  out=$(mktemp "$DEST/.$1.XXXXXX" 2>&1) || write_failed "$DEST" "${out##*: }"
  printf '%s\n' "$out"
}
download() {  # url, output file
  if command -v curl > /dev/null; then curl -fsSL --retry 2 --connect-timeout 30 -o "$2" "$1"
  elif [[ "$1" == file://* ]]; then cp -- "${1#file://}" "$2"
  elif command -v wget > /dev/null; then wget -q -O "$2" "$1"
  else echo "error: neither curl nor wget is installed" >&2; return 127
  fi
}
is_write_error() {  # exit status $1 of download: the output file could not be written (curl 23, wget 3)
  { [ "$1" -eq 23 ] && command -v curl > /dev/null; } || { [ "$1" -eq 3 ] && ! command -v curl > /dev/null; }
}
looks_like_checkpoint() {  # a zip (torch.save since 1.6) or a pickle (older torch.save), not e.g. an HTML page
  local magic
  magic=$(head -c 2 "$1" | od -An -tx1 | tr -d ' \n')
  [ "$magic" = 504b ] || [ "${magic:0:2}" = 80 ]
}
# Copy the archive member named exactly $2 (or ./$2) of the tar file $1 into the file $3, if it is
# a regular file: no other member is read, no path from the archive is used, links are refused.
# Exit status: 0 copied (and flushed to disk), 3 not a readable tar file, 4 no such member, 5 not
# one regular file, 6 $3 could not be written (the reason alone on stderr).
UNPACK='
import os, sys, tarfile
archive, name, out = sys.argv[1:4]
def stop(status, message):
    print(message, file=sys.stderr)
    sys.exit(status)
try:
    tar = tarfile.open(archive, "r:*")
    found = [m for m in tar.getmembers() if m.name in (name, "./" + name)]
except (tarfile.TarError, OSError, EOFError):
    stop(3, f"error: {archive} is not a readable tar archive (an error page or a partial download?)")
if not found:
    sys.exit(4)
if len(found) > 1 or not found[0].isreg():
    stop(5, f"error: {name} in {archive} is " + ("several members" if len(found) > 1 else "a link or other non-regular member"))
try:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
except OSError as err:
    stop(6, err.strerror or str(err))
with tar, tar.extractfile(found[0]) as src:
    while True:
        try:
            chunk = memoryview(src.read(1 << 20))
        except (tarfile.TarError, OSError, EOFError):
            stop(3, f"error: {archive} ends before {name} does (a partial download?)")
        if not chunk:
            break
        try:
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        except OSError as err:
            stop(6, err.strerror or str(err))
try:
    os.fsync(fd)
    os.close(fd)
except OSError as err:
    stop(6, err.strerror or str(err))
'

TMP="" TMP_ARCHIVE=""
trap 'rm -f ${TMP:+"$TMP"} ${TMP_ARCHIVE:+"$TMP_ARCHIVE"}' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
failed=0
to_add=""     # manifest lines of files installed without a checksum of their own
unverified="" # set when one of them was not verified at all

install_file() {  # name, temporary file, expected file SHA-256 (or empty), what verified it instead (or empty)
  local name=$1 tmp=$2 expected=$3 verified_by=$4 rel dest actual err
  rel="${name}_vanilla/ckpt_epoch_240.pth"
  dest="$DEST/$rel"
  actual=$(sha256_of "$tmp")
  if [ -n "$expected" ] && [ "$actual" != "$expected" ]; then
    echo "error: checksum mismatch for $rel: its SHA-256 is $actual but $CHECKSUMS says $expected;" >&2
    echo "  $name not installed (a corrupt or different file: retry, or check the source)" >&2
    rm -f "$tmp"; failed=$((failed + 1)); return 0
  fi
  if [ -z "$expected" ] && [ -z "$verified_by" ] && ! looks_like_checkpoint "$tmp"; then
    echo "error: the file for $name is not a PyTorch checkpoint (an error page?); $name not installed" >&2
    rm -f "$tmp"; failed=$((failed + 1)); return 0
  fi
  err=$(chmod 644 "$tmp" 2>&1 && mkdir -p "$(dirname "$dest")" 2>&1 && mv -f "$tmp" "$dest" 2>&1) ||
    write_failed "$dest" "${err##*: }"
  if [ -n "$expected" ]; then
    echo "installed $dest (SHA-256 verified)"
    return 0
  fi
  if [ -n "$verified_by" ]; then
    echo "installed $dest (verified by the SHA-256 of $verified_by)"
  else
    echo "installed $dest UNVERIFIED"
    unverified=1
  fi
  to_add="$to_add$actual  $rel"$'\n'
}

wanted=""  # names to fetch, after the checks below
for name in $NAMES; do
  if [[ ! "$name" =~ ^[A-Za-z0-9_]+$ ]]; then echo "error: '$name' is not a model name" >&2; failed=$((failed + 1)); continue; fi
  rel="${name}_vanilla/ckpt_epoch_240.pth"
  dest="$DEST/$rel"
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
  wanted="$wanted $name"
done

if [ "$SOURCE" = repdistiller ]; then
  for name in $wanted; do
    rel="${name}_vanilla/ckpt_epoch_240.pth"
    url="$BASE_URL/$rel"
    expected=$(expected_sha256 "$rel")
    if [ -z "$expected" ] && [ -z "${ALLOW_UNVERIFIED:-}" ]; then
      echo "error: no checksum for $rel in $CHECKSUMS, so $name is not fetched. Either add its line to the" >&2
      echo "  manifest (or give your own with CHECKSUMS=<file>), or run with ALLOW_UNVERIFIED=1 to install it" >&2
      echo "  unverified and print the line to add." >&2
      failed=$((failed + 1)); continue
    fi
    TMP=$(new_temp "${name}_ckpt_epoch_240.pth") || exit 1
    echo "fetching $url"
    status=0
    err=$(download "$url" "$TMP" 2>&1) || status=$?
    if is_write_error "$status"; then write_failed "$DEST/$rel" "$err"; fi
    if [ "$status" -ne 0 ]; then
      [ -z "$err" ] || echo "$err" >&2
      echo "error: could not download $url (exit status $status); $name not installed. If the server is down or" >&2
      echo "  the file moved, use SOURCE=mdistiller (the default), set BASE_URL to a mirror holding" >&2
      echo "  <name>_vanilla/ckpt_epoch_240.pth (file:///path for a local copy), or train the teacher:" >&2
      echo "  TEACHERS=$name STUDENTS= bash scripts/run_cifar_vanilla.sh" >&2
      rm -f "$TMP"; TMP=""; failed=$((failed + 1)); continue
    fi
    install_file "$name" "$TMP" "$expected" ""
    TMP=""
  done
else
  archive_name=cifar_teachers.tar  # the manifest's name for the archive, whatever the file is called here
  archive_expected=$(expected_sha256 "$archive_name")
  fetch=""
  for name in $wanted; do
    rel="${name}_vanilla/ckpt_epoch_240.pth"
    if [ -z "$archive_expected" ] && [ -z "$(expected_sha256 "$rel")" ] && [ -z "${ALLOW_UNVERIFIED:-}" ]; then
      echo "error: no checksum for $rel (nor for the archive $archive_name) in $CHECKSUMS, so $name is not" >&2
      echo "  fetched. Either add a line to the manifest (or give your own with CHECKSUMS=<file>), or run with" >&2
      echo "  ALLOW_UNVERIFIED=1 to install it unverified and print the lines to add." >&2
      failed=$((failed + 1)); continue
    fi
    fetch="$fetch $name"
  done
  if [ -n "$fetch" ]; then
    archive=""
    if [[ "$ARCHIVE_URL" == file://* ]] || [[ "$ARCHIVE_URL" != *://* ]]; then  # a local file: read in place
      archive=${ARCHIVE_URL#file://}
      if [ ! -f "$archive" ]; then
        echo "error: the archive $archive does not exist (ARCHIVE_URL); nothing installed" >&2
        archive=""
      else
        echo "reading $archive"
      fi
    else
      TMP_ARCHIVE=$(new_temp "$archive_name") || exit 1
      echo "fetching $ARCHIVE_URL"
      status=0
      err=$(download "$ARCHIVE_URL" "$TMP_ARCHIVE" 2>&1) || status=$?
      if is_write_error "$status"; then write_failed "the download of $archive_name in $DEST" "$err"; fi
      if [ "$status" -eq 0 ]; then
        archive=$TMP_ARCHIVE
      else
        [ -z "$err" ] || echo "$err" >&2
        echo "error: could not download $ARCHIVE_URL (exit status $status); nothing installed. Download it another" >&2
        echo "  way and give its path (ARCHIVE_URL=/path/to/$archive_name), use a mirror of the single files" >&2
        echo "  (SOURCE=repdistiller BASE_URL=...), or train the teachers: TEACHERS=\"$(echo $fetch)\" STUDENTS= bash scripts/run_cifar_vanilla.sh" >&2
      fi
    fi
    verified_by=""
    make_dest
    if [ -n "$archive" ]; then
      archive_sha=$(sha256_of "$archive")
      echo "SHA-256 of $archive_name: $archive_sha"
      if [ -n "$archive_expected" ] && [ "$archive_sha" != "$archive_expected" ]; then
        echo "error: checksum mismatch for $archive_name: its SHA-256 is $archive_sha but $CHECKSUMS says" >&2
        echo "  $archive_expected; nothing installed (a corrupt or different file: retry, or check the source)" >&2
        archive=""
      elif [ -n "$archive_expected" ]; then
        verified_by=$archive_name
      fi
    fi
    for name in $fetch; do
      if [ -z "$archive" ]; then failed=$((failed + 1)); continue; fi
      rel="${name}_vanilla/ckpt_epoch_240.pth"
      TMP=$(new_temp "${name}_ckpt_epoch_240.pth") || exit 1
      status=0
      err=$("$(python_cmd)" -c "$UNPACK" "$archive" "$ARCHIVE_ROOT/$rel" "$TMP" 2>&1) || status=$?
      case "$status" in
        0) install_file "$name" "$TMP" "$(expected_sha256 "$rel")" "$verified_by" ;;
        4) echo "error: $archive_name has no $ARCHIVE_ROOT/$rel; $name not installed" >&2 ;;
        6) write_failed "$DEST/$rel" "$err" ;;
        *) [ -z "$err" ] || echo "$err" >&2; echo "  so $name is not installed" >&2 ;;
      esac
      [ "$status" -eq 0 ] || { rm -f "$TMP"; failed=$((failed + 1)); }
      TMP=""
      [ "$status" -ne 3 ] || archive=""  # not a tar file: the other names cannot come from it either
    done
    if [ -n "$unverified" ] && [ -z "$archive_expected" ] && [ -n "${archive_sha:-}" ]; then
      to_add="$archive_sha  $archive_name"$'\n'"$to_add"
    fi
  fi
fi

if [ -n "$to_add" ]; then
  if [ -n "$unverified" ]; then
    echo "Once you trust these files (e.g. the teacher's test top-1, printed at the start of every"
    echo "train_student.py run, against the README's table), add these lines to $CHECKSUMS:"
  else
    echo "To let later runs verify the installed files themselves, add these lines to $CHECKSUMS:"
  fi
  printf '%s' "$to_add"
fi
if [ "$failed" -gt 0 ]; then echo "$failed teacher(s) not installed (see the errors above)" >&2; exit 1; fi
