import { isIPv4, isIPv6 } from 'node:net'

// PROXY protocol v2 constants, from the HAProxy specification.
const SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a])
const VERSION_2_PROXY = 0x21
const VERSION_2_LOCAL = 0x20
const TCP_OVER_IPV4 = 0x11
const TCP_OVER_IPV6 = 0x21
const UNSPECIFIED = 0x00

/** TLV types this gateway writes in a v2 header. */
export const TLV = {
  /** PP2_TYPE_AUTHORITY: the request's Host header. */
  AUTHORITY: 0x02,
  /** Custom range (PP2_TYPE_MIN_CUSTOM): the chosen WebSocket sub-protocol. */
  SUBPROTOCOL: 0xe0,
  /** Custom range: the request path, with its query string. */
  PATH: 0xe1,
  /** Custom range: the request's Origin header. */
  ORIGIN: 0xe2
} as const

/** Who is calling, as the PROXY header tells the upstream. */
export interface ProxyInfo {
  sourceAddress: string
  sourcePort: number
  destinationAddress: string
  destinationPort: number
  authority?: string
  subprotocol?: string
  path?: string
  origin?: string
}

/** Builds a PROXY protocol header, version 'v1' (text) or 'v2' (binary, with TLVs).
 *  Addresses that are not IP (a unix-socket listener) give 'UNKNOWN' (v1) or a LOCAL header (v2); a TLV that
 *  would take the v2 header's length past 65535 bytes is left out, never cut. */
export function proxyHeader (version: 'v1' | 'v2', info: ProxyInfo): Buffer {
  const addresses = pairAddresses(info.sourceAddress, info.destinationAddress)
  if (version === 'v1') {
    if (addresses === null) return Buffer.from('PROXY UNKNOWN\r\n')
    const family = addresses.ipv6 ? 'TCP6' : 'TCP4'
    return Buffer.from(`PROXY ${family} ${addresses.source} ${addresses.destination} ${info.sourcePort} ${info.destinationPort}\r\n`)
  }
  let block: Buffer
  if (addresses === null) {
    block = Buffer.alloc(0)
  } else if (addresses.ipv6) {
    block = Buffer.alloc(36)
    ipv6Bytes(addresses.source).copy(block, 0)
    ipv6Bytes(addresses.destination).copy(block, 16)
    block.writeUInt16BE(info.sourcePort, 32)
    block.writeUInt16BE(info.destinationPort, 34)
  } else {
    block = Buffer.alloc(12)
    Buffer.from(addresses.source.split('.').map(Number)).copy(block, 0)
    Buffer.from(addresses.destination.split('.').map(Number)).copy(block, 4)
    block.writeUInt16BE(info.sourcePort, 8)
    block.writeUInt16BE(info.destinationPort, 10)
  }
  const header = Buffer.alloc(16)
  SIGNATURE.copy(header, 0)
  header[12] = addresses === null ? VERSION_2_LOCAL : VERSION_2_PROXY
  header[13] = addresses === null ? UNSPECIFIED : addresses.ipv6 ? TCP_OVER_IPV6 : TCP_OVER_IPV4
  const parts = [block]
  let length = block.length
  for (const [type, value] of [[TLV.AUTHORITY, info.authority], [TLV.SUBPROTOCOL, info.subprotocol], [TLV.PATH, info.path], [TLV.ORIGIN, info.origin]] as const) {
    if (value === undefined || value === '') continue
    const bytes = Buffer.from(value, 'utf8')
    // The header's length is 16 bits; a cut value would read as a different Host or path, so it is left out.
    if (length + 3 + bytes.length > 0xffff) continue
    parts.push(Buffer.from([type, bytes.length >> 8, bytes.length & 0xff]), bytes)
    length += 3 + bytes.length
  }
  header.writeUInt16BE(length, 14)
  return Buffer.concat([header, ...parts])
}

/** Both addresses in one family: IPv4 if both are (or map to) IPv4, else IPv6; null if either is not IP. */
function pairAddresses (source: string, destination: string): { source: string, destination: string, ipv6: boolean } | null {
  const from = unmap(unzone(source))
  const to = unmap(unzone(destination))
  if (isIPv4(from) && isIPv4(to)) return { source: from, destination: to, ipv6: false }
  if (!(isIP(from) && isIP(to))) return null
  return { source: isIPv4(from) ? `::ffff:${from}` : from, destination: isIPv4(to) ? `::ffff:${to}` : to, ipv6: true }
}

function isIP (address: string): boolean {
  return isIPv4(address) || isIPv6(address)
}

/** 'fe80::1%eth0' → 'fe80::1': the zone names an interface of this host, meaningless to the upstream
 *  (and neither PROXY format has room for it). */
function unzone (address: string): string {
  const percent = address.indexOf('%')
  return percent !== -1 && isIPv6(address) ? address.slice(0, percent) : address
}

/** '::ffff:1.2.3.4' → '1.2.3.4'; anything else unchanged. */
function unmap (address: string): string {
  return /^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(address) ? address.slice(7) : address
}

/** The 16 bytes of an IPv6 address (which may end in dotted IPv4). */
function ipv6Bytes (address: string): Buffer {
  let text = address
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text)
  if (dotted !== null) {
    const [a, b, c, d] = dotted[1].split('.').map(Number)
    text = text.slice(0, dotted.index) + ((a << 8) | b).toString(16) + ':' + ((c << 8) | d).toString(16)
  }
  const [head, tail = ''] = text.split('::')
  const headGroups = head === '' ? [] : head.split(':')
  const tailGroups = text.includes('::') && tail !== '' ? tail.split(':') : []
  const groups = text.includes('::')
    ? [...headGroups, ...new Array(8 - headGroups.length - tailGroups.length).fill('0'), ...tailGroups]
    : headGroups
  const bytes = Buffer.alloc(16)
  groups.forEach((group, index) => bytes.writeUInt16BE(parseInt(group, 16), index * 2))
  return bytes
}
