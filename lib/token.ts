import { createHash } from 'node:crypto'

/** A token's name in logs, error messages and PROXY headers: `sha256:` and 8 hex digits, never the token. */
export function tokenId (token: string): string {
  return 'sha256:' + createHash('sha256').update(token).digest('hex').slice(0, 8)
}
