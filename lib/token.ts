import { createHash } from 'node:crypto'

/** A token's name in logs, error messages and PROXY headers: `sha256:` and 8 hex digits, never the token. */
export function tokenId (token: string): string {
  return 'sha256:' + createHash('sha256').update(token).digest('hex').slice(0, 8)
}

/** `text` with every quoted sub-protocol entry `"<prefix><token>"` showing the token's id instead. */
export function redactBearerEntries (text: string, prefix: string): string {
  return text.replace(/"([^"]*)"/g, (quoted, entry: string) => entry.startsWith(prefix) ? `"${prefix}${tokenId(entry.slice(prefix.length))}"` : quoted)
}
