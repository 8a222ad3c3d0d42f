#!/usr/bin/env bash
# Fails when a tracked file is an executable binary (built output has no
# place in the tree; scripts with a #! line are fine), or is larger than
# 2 MiB outside a testdata/ directory. Run by `make lint`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
limit=$((2 << 20))
bad=0
while IFS= read -r -d '' entry; do
  mode=${entry%% *}
  path=${entry#*$'\t'}
  [ -f "$path" ] || continue # deleted in the work tree, not yet in the index
  size=$(stat -c %s "$path")
  if [ "$mode" = 100755 ] && [ "$(head -c 2 "$path")" != '#!' ] && head -c 8000 "$path" | LC_ALL=C grep -qaP '\x00'; then
    echo "tracked-files: $path is an executable binary: remove it (git rm --cached) and ignore it" >&2
    bad=1
  fi
  case "/$path" in
  */testdata/*) ;;
  *)
    if [ "$size" -gt "$limit" ]; then
      echo "tracked-files: $path is $((size >> 10)) KiB, over the 2 MiB (2048 KiB) limit outside testdata/" >&2
      bad=1
    fi
    ;;
  esac
done < <(git ls-files -s -z | sed -z 's/^\([0-9]*\) [0-9a-f]* [0-9]*\t/\1 \t/')
exit $bad
