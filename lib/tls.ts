import { readFileSync } from 'node:fs'
import type { ConnectionOptions } from 'node:tls'

/** The `tls` option of a route or an upstream: true, false, or the settings (certificates as paths or PEM). */
export type TlsOption = boolean | {
  servername?: string
  ca?: string | string[]
  cert?: string
  key?: string
  rejectUnauthorized?: boolean
}

/** An upstream's TLS settings, resolved over the route's: null for plain TCP. Certificate files are read here,
 *  at registration; each one that cannot be read adds a line naming it to `problems`. */
export function resolveTls (option: TlsOption | undefined, inherited: ConnectionOptions | null, at: string, problems: string[]): ConnectionOptions | null {
  if (option === undefined) return inherited
  if (option === false) return null
  if (option === true) return inherited ?? {}
  const resolved: ConnectionOptions = { ...inherited }
  if (option.servername !== undefined) resolved.servername = option.servername
  if (option.rejectUnauthorized !== undefined) resolved.rejectUnauthorized = option.rejectUnauthorized
  if (option.ca !== undefined) {
    const list = Array.isArray(option.ca) ? option.ca : [option.ca]
    resolved.ca = list.map((entry, index) => pem(entry, Array.isArray(option.ca) ? `${at}.ca[${index}]` : `${at}.ca`, problems))
  }
  if (option.cert !== undefined) resolved.cert = pem(option.cert, `${at}.cert`, problems)
  if (option.key !== undefined) resolved.key = pem(option.key, `${at}.key`, problems)
  return resolved
}

function pem (value: string, at: string, problems: string[]): string | Buffer {
  if (value.includes('-----BEGIN')) return value
  try {
    return readFileSync(value)
  } catch (err) {
    problems.push(`${at}: cannot read ${value}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
    return ''
  }
}
