// Package keys holds key material and the principal-key providers that wrap
// data keys. Unwrapped keys live in Secret (locked, non-dumpable memory,
// zeroed on Wipe); providers wrap and unwrap 64-byte data keys with
// AES-256-GCM bound to the volume and slot. The file provider is for
// development; production volumes use a KMIP key manager.
package keys
