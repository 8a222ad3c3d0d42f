package cluster

import (
	"bytes"
	"io"
	"strings"
)

// keyErrorTexts are what memberlist says when a message was encrypted with
// another key (or not at all).
// Compared in lower case.
var keyErrorTexts = []string{
	"no installed keys could decrypt",
	"encryption is configured but remote state is not encrypted",
	"failed to decrypt",
}

func isKeyError(err error) bool {
	for _, t := range keyErrorTexts {
		if strings.Contains(strings.ToLower(err.Error()), t) {
			return true
		}
	}
	return false
}

// keyHintWriter adds a plain explanation to memberlist's log lines about
// undecryptable messages: an operator reading "No installed keys could
// decrypt the message" should learn that a machine with another cluster
// key is knocking.
type keyHintWriter struct{ next io.Writer }

func (w *keyHintWriter) Write(p []byte) (int, error) {
	for _, t := range keyErrorTexts {
		if bytes.Contains(bytes.ToLower(p), []byte(t)) {
			line := bytes.TrimRight(p, "\n")
			hinted := append(append([]byte{}, line...), []byte(" (a machine whose cluster key differs from ours was refused)\n")...)
			if _, err := w.next.Write(hinted); err != nil {
				return 0, err
			}
			return len(p), nil
		}
	}
	return w.next.Write(p)
}
