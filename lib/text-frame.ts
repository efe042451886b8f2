import { isUtf8 } from 'node:buffer'

/** Cuts an upstream byte stream into text messages that never split a UTF-8 character.
 *  In 'close' mode invalid bytes are reported (push returns null); in 'replace' mode they become U+FFFD. */
export class TextFramer {
  private tail: Buffer | null = null
  private readonly decoder: TextDecoder | null

  constructor (invalidUtf8: 'close' | 'replace') {
    this.decoder = invalidUtf8 === 'replace' ? new TextDecoder('utf-8', { fatal: false }) : null
  }

  /** Returns the complete text in `bytes` (valid UTF-8 in memory of its own, or a string in replace mode),
   *  or null when the bytes are not UTF-8. A character cut at the end waits for the next push. `bytes` is
   *  not kept. */
  push (bytes: Buffer): Buffer | string | null {
    if (this.decoder !== null) return this.decoder.decode(bytes, { stream: true })
    let chunk = this.tail === null ? Buffer.from(bytes) : Buffer.concat([this.tail, bytes])
    this.tail = null
    const end = completeLength(chunk)
    if (end < chunk.length) {
      this.tail = Buffer.from(chunk.subarray(end))
      chunk = chunk.subarray(0, end)
    }
    return isUtf8(chunk) ? chunk : null
  }

  /** At the end of the stream: the text still held back, '' if none, or null if it is a cut character. */
  end (): string | null {
    if (this.decoder !== null) return this.decoder.decode()
    return this.tail === null ? '' : null
  }
}

/** Returns how many leading bytes of `bytes` end on a character boundary (the rest: a character cut short). */
export function completeLength (bytes: Buffer): number {
  const length = bytes.length
  for (let i = length - 1; i >= 0 && i >= length - 4; i--) {
    const byte = bytes[i]
    if ((byte & 0xc0) === 0x80) continue // continuation byte: keep looking for the lead byte
    const size = byte >= 0xf0 ? 4 : byte >= 0xe0 ? 3 : byte >= 0xc0 ? 2 : 1
    return i + size > length ? i : length
  }
  return length
}
