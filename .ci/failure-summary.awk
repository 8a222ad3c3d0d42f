# Reads `go test -v` output and, when a test failed, ends with what each
# failed test itself said last, without the daemon log tails the lab
# prints on failure (they are long, and push the failure message out of
# the end of a CI log). Used by `make e2e`.
#
#   go test -v ... | tee LOG; awk -f .ci/failure-summary.awk LOG
function keep(line) {
	said[current, kept[current] % keepLines] = line
	kept[current]++
}
BEGIN { keepLines = 20 }
/^=== RUN / { current = $3; inDump = 0; next }
/^=== (PAUSE|CONT|NAME) / { current = $3; next }
/^--- FAIL: / { failed[++nfailed] = $3; next }
/^    [A-Za-z0-9_]+\.go:[0-9]+: / {
	inDump = ($0 ~ /droverd log \(tail\) ---/)
	if (!inDump && current != "") keep($0)
	next
}
/^        / { if (!inDump && current != "") keep($0); next }
END {
	if (nfailed == 0) exit 0
	print ""
	print "=== what each failed test said last (daemon log tails left out; they are above) ==="
	for (i = 1; i <= nfailed; i++) {
		name = failed[i]
		print "--- " name
		n = kept[name]
		from = n > keepLines ? n - keepLines : 0
		for (j = from; j < n; j++) print said[name, j % keepLines]
	}
}
