import { BlockList, isIP, isIPv4, isIPv6 } from 'node:net'
import { lookup as dnsLookup } from 'node:dns/promises'

/** One compiled entry: the ports it opens, and the addresses (one subnet) or the names (one pattern) it covers. */
type Rule = { low: number, high: number } & ({ family: 'ipv4' | 'ipv6', addresses: BlockList } | { family: 'name', labels: string[][] })

/** A compiled allow-list; opaque to callers, who only pass it to allowedAddresses. */
export interface AllowList { readonly rules: readonly Rule[] }

/** Resolves a name to all its addresses, in the resolver's order. */
type Lookup = (host: string) => Promise<Array<{ address: string, family: number }>>

const HELP = "(use 'host:port', 'ip/prefix:port', '[ipv6]:port', 'name-*.domain:port'; port 'N', 'N-M' or '*')"
const ENTRY = /^(?:\[([^\]]+)\]|([^[\]:]+)):(\*|\d{1,5}(?:-\d{1,5})?)$/
const TARGET = /^(?:\[([^\]]+)\]|([^[\]:]+)):(\d{1,5})$/
const FORBIDDEN = /[\s\p{Cc}/\\@%#?]/u
const PATTERN_LABEL = /^[a-z0-9_*-]+$/
const LABEL = /^[a-z0-9_-]+$/
// A last label like '1' or '0x7f' makes getaddrinfo (and URL) read the whole name as an IPv4 address.
const NUMERIC_LABEL = /(?:^|\.)(?:\d+|0x[0-9a-f]*)$/
const MAPPED = /^\[::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})\]$/
const defaultLookup: Lookup = async host => await dnsLookup(host, { all: true, verbatim: true })

/** Compiles allow-list entries once; every malformed entry adds a line to `problems` (prefixed with `${at}[i]`). */
export function compileAllowList (entries: readonly string[], at: string, problems: string[]): AllowList {
  const rules: Rule[] = []
  entries.forEach((entry, index) => {
    const rule = typeof entry === 'string' ? compileEntry(entry) : null
    if (rule === null) problems.push(`${at}[${index}]: ${JSON.stringify(entry)} is not an allow-list entry ${HELP}`)
    else rules.push(rule)
  })
  return { rules }
}

function compileEntry (entry: string): Rule | null {
  const match = ENTRY.exec(entry)
  if (match === null) return null
  const [low, high = low] = match[3] === '*' ? [1, 65535] : match[3].split('-').map(Number)
  if (low < 1 || low > high || high > 65535) return null
  const ports = { low, high }
  const host = match[1] ?? match[2]
  if (match[1] === undefined && !host.includes('/') && !isIPv4(host)) return compileName(host, ports)
  const [address, prefixText, extra] = host.split('/')
  const width = match[1] === undefined ? 32 : 128
  const prefix = prefixText === undefined ? width : /^\d{1,3}$/.test(prefixText) ? Number(prefixText) : -1
  const judged = (width === 32 ? isIPv4(address) : isIPv6(address)) ? judge(address) : null
  if (judged === null || extra !== undefined || prefix < 0 || prefix > width) return null
  const addresses = new BlockList()
  // '[::ffff:10.0.0.0/104]' is the IPv4 subnet 10.0.0.0/8, as requested mapped addresses are judged as IPv4.
  if (judged.family === 'ipv4' && prefix >= width - 32) {
    addresses.addSubnet(judged.ip, prefix - (width - 32), 'ipv4')
    return { ...ports, family: 'ipv4', addresses }
  }
  addresses.addSubnet(address, prefix, width === 32 ? 'ipv4' : 'ipv6')
  return { ...ports, family: width === 32 ? 'ipv4' : 'ipv6', addresses }
}

function compileName (host: string, ports: { low: number, high: number }): Rule | null {
  const name = host.toLowerCase().replace(/\.$/, '')
  const labels = name.split('.')
  if (!labels.every(label => PATTERN_LABEL.test(label)) || NUMERIC_LABEL.test(name)) return null
  return { ...ports, family: 'name', labels: labels.map(label => label.split('*')) }
}

/** Does a name match a pattern, label by label? Each '*' takes one or more of [a-z0-9_-] and no dot. Matched
 *  left to right with indexOf, without backtracking: a request's length cannot make it slow. */
function matchName (pattern: string[][], name: string): boolean {
  const labels = name.split('.')
  return labels.length === pattern.length && pattern.every((parts, index) => matchLabel(parts, labels[index]))
}

function matchLabel (parts: string[], label: string): boolean {
  if (parts.length === 1) return label === parts[0]
  if (!LABEL.test(label) || !label.startsWith(parts[0])) return false
  let position = parts[0].length
  for (let index = 1; index < parts.length - 1; index++) {
    const found = label.indexOf(parts[index], position + 1) // the '*' before it takes at least one character
    if (found === -1) return false
    position = found + parts[index].length
  }
  const last = parts[parts.length - 1]
  return label.length - last.length > position && label.endsWith(last)
}

/** Parses a requested target 'host:port' or '[ipv6]:port' (port 1..65535); null if malformed.
 *  Host returned without brackets, lower-cased, no trailing dot. */
export function parseTargetAddress (value: string): { host: string, port: number } | null {
  const match = FORBIDDEN.test(value) ? null : TARGET.exec(value)
  if (match === null) return null
  const port = Number(match[3])
  const host = match[1]?.toLowerCase() ?? match[2].toLowerCase().replace(/\.$/, '')
  if (match[1] !== undefined && !isIPv6(host)) return null
  // DNS's limits (RFC 1035 section 2.3.4): a longer name cannot resolve, and is refused before any work.
  if (host.length > 253 || host.split('.').some(label => label.length > 63)) return null
  return host === '' || port < 1 || port > 65535 ? null : { host, port }
}

/** The addresses a requested target may connect to, in the order to try them: an IP literal or a name's
 *  resolved addresses if an address entry allows them, or the name itself if a name entry allows it. */
export async function allowedAddresses (list: AllowList, target: { host: string, port: number }, lookup: Lookup = defaultLookup): Promise<Array<{ host: string, port: number }>> {
  const { port } = target
  const host = target.host.toLowerCase().replace(/\.$/, '')
  if (host === '' || !Number.isInteger(port) || port < 1 || port > 65535) return []
  if (isIP(host) !== 0) {
    const ip = allowedIP(list, host, port)
    return ip === null ? [] : [{ host: ip, port }]
  }
  const byName = !NUMERIC_LABEL.test(host) && list.rules.some(rule =>
    rule.family === 'name' && port >= rule.low && port <= rule.high && matchName(rule.labels, host))
  if (byName) return [{ host, port }]
  let resolved: Array<{ address: string }>
  try {
    resolved = await lookup(host)
  } catch {
    return []
  }
  // The caller connects to the checked address, so a second resolution cannot rebind the name.
  const allowed = new Set<string>()
  for (const { address } of resolved) {
    const ip = allowedIP(list, address, port)
    if (ip !== null) allowed.add(ip)
  }
  return [...allowed].map(ip => ({ host: ip, port }))
}

/** The address as judged (see judge) if an address entry allows it with this port, else null. */
function allowedIP (list: AllowList, address: string, port: number): string | null {
  const judged = judge(address)
  if (judged === null) return null
  const { ip, family } = judged
  // Each address is checked against its own family's entries only: BlockList on its own lets an IPv6 entry
  // such as '[::/0]' match every IPv4 address, and an IPv4 entry match '::ffff:a.b.c.d'.
  const allowed = list.rules.some(rule =>
    rule.family === family && port >= rule.low && port <= rule.high && rule.addresses.check(ip, family))
  return allowed ? ip : null
}

/** An IP address as it is judged and connected to: an IPv4-mapped IPv6 address becomes the IPv4 address it
 *  maps to, IPv6 is compressed; null for anything else (names, zone ids). */
function judge (address: string): { ip: string, family: 'ipv4' | 'ipv6' } | null {
  if (isIPv4(address)) return { ip: address, family: 'ipv4' }
  if (!isIPv6(address) || address.includes('%')) return null
  let canonical: string
  try {
    canonical = new URL(`http://[${address}]`).hostname
  } catch {
    return null
  }
  const mapped = MAPPED.exec(canonical)
  if (mapped === null) return { ip: canonical.slice(1, -1), family: 'ipv6' }
  const high = parseInt(mapped[1], 16)
  const low = parseInt(mapped[2], 16)
  return { ip: `${high >> 8}.${high & 255}.${low >> 8}.${low & 255}`, family: 'ipv4' }
}
