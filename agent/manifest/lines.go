package manifest

import (
	"fmt"
	"strings"
)

// keyLines maps dotted key paths to the line that defines them, by
// scanning the TOML source: table headers ([a.b], [[a.b]] with a running
// index) and `key =` lines. Array-of-table entries are recorded both with
// their index (services.web.volumes[1].quota) and without it (the first
// occurrence), since the TOML decoder names unknown keys without one.
// Keys inside multi-line inline values map to the line of their parent.
func keyLines(src string) map[string]int {
	lines := map[string]int{}
	counts := map[string]int{}
	set := func(k string, n int) {
		if _, ok := lines[k]; !ok {
			lines[k] = n
		}
	}
	table, plain := "", ""
	for i, raw := range strings.Split(src, "\n") {
		n := i + 1
		line := strings.TrimSpace(raw)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "[["):
			name := unquote(strings.SplitN(line[2:], "]]", 2)[0])
			idx := counts[name]
			counts[name]++
			table, plain = fmt.Sprintf("%s[%d]", name, idx), name
			set(table, n)
			set(plain, n)
		case strings.HasPrefix(line, "["):
			name := unquote(strings.TrimSpace(strings.SplitN(line[1:], "]", 2)[0]))
			table, plain = name, name
			set(table, n)
		default:
			eq := strings.Index(line, "=")
			if eq <= 0 {
				continue
			}
			k := unquote(strings.TrimSpace(line[:eq]))
			if table == "" {
				set(k, n)
				continue
			}
			set(table+"."+k, n)
			set(plain+"."+k, n)
		}
	}
	return lines
}

// unquote removes quotes around dotted key parts: "a"."b" -> a.b.
func unquote(k string) string {
	parts := strings.Split(k, ".")
	for i, p := range parts {
		parts[i] = strings.Trim(strings.TrimSpace(p), `"'`)
	}
	return strings.Join(parts, ".")
}
