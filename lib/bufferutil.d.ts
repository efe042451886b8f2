declare module 'bufferutil' {
  /** XORs `length` bytes of `source` with the 4-byte `mask` into `output` from `offset`. */
  export function mask (source: Buffer, mask: Buffer, output: Buffer, offset: number, length: number): void
  export function unmask (buffer: Buffer, mask: Buffer): void
}
