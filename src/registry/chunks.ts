import type { Readable } from 'node:stream'

/** Up to one chunk of a blob, kept as the Buffers it was read in (joining them would copy it). */
export class Chunk {
  constructor(
    readonly parts: Buffer[],
    readonly length: number,
  ) {}

  /** The bytes from `offset` on, as Buffers sharing this chunk's memory. */
  from(offset: number): Buffer[] {
    const out: Buffer[] = []
    let skip = offset
    for (const part of this.parts) {
      if (skip >= part.length) {
        skip -= part.length
        continue
      }
      out.push(skip > 0 ? part.subarray(skip) : part)
      skip = 0
    }
    return out
  }
}

/** Cuts `stream`'s bytes into chunks of exactly `size` bytes; the last may be shorter (none if empty). */
export async function* readChunks(stream: Readable, size: number): AsyncGenerator<Chunk> {
  let parts: Buffer[] = []
  let have = 0
  for await (const data of stream) {
    let buf = typeof data === 'string' ? Buffer.from(data) : (data as Buffer)
    while (have + buf.length >= size) {
      const take = size - have
      parts.push(buf.subarray(0, take))
      yield new Chunk(parts, size)
      buf = buf.subarray(take)
      parts = []
      have = 0
    }
    if (buf.length > 0) {
      parts.push(buf)
      have += buf.length
    }
  }
  if (have > 0) yield new Chunk(parts, have)
}
