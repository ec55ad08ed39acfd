/** Where a request body is written: a ClientRequest, as far as a body needs one. */
export interface BodySink {
  write(chunk: Buffer): boolean
  readonly destroyed: boolean
}

/**
 * One piece of an upload, of a length fixed in advance (`capacity`), kept as the Buffers it was
 * read in (joining them would copy it). Its bytes may still be arriving: {@link streamTo} sends
 * what is there and then the rest as it comes, so that a request can start before the whole
 * chunk has been read, while the chunk keeps every byte for a retry.
 */
export class Chunk {
  readonly parts: Buffer[] = []
  length = 0
  #failure: Error | undefined
  #waiters: (() => void)[] = []

  constructor(readonly capacity: number) {}

  /** True once {@link fail} was called. */
  get failed(): boolean {
    return this.#failure !== undefined
  }

  /** True once `capacity` bytes are in. */
  get complete(): boolean {
    return this.length === this.capacity
  }

  /** Appends bytes; MUST NOT go past `capacity`. */
  add(buf: Buffer): void {
    if (this.length + buf.length > this.capacity) throw new RangeError(`chunk overflow: ${this.length} + ${buf.length} > ${this.capacity}`)
    this.parts.push(buf)
    this.length += buf.length
    this.#wake()
  }

  /** No more bytes will come: a sender waiting for them rejects with `err`. */
  fail(err: Error): void {
    this.#failure ??= err
    this.#wake()
  }

  /** Resolves once the chunk is complete; rejects if it failed first. */
  async whenComplete(): Promise<void> {
    while (!this.complete) await this.#next()
  }

  /**
   * Writes the bytes from `offset` on to `out` as they arrive, resolving once the last one is
   * written (or `out` was destroyed, which its request reports). Rejects if the chunk fails
   * before it is complete.
   */
  async streamTo(out: BodySink, offset = 0): Promise<void> {
    let at = 0
    let skip = offset
    for (;;) {
      while (at < this.parts.length) {
        const part = this.parts[at++]
        if (skip >= part.length) {
          skip -= part.length
          continue
        }
        if (out.destroyed) return
        out.write(skip > 0 ? part.subarray(skip) : part)
        skip = 0
      }
      if (this.complete || out.destroyed) return
      await this.#next()
    }
  }

  /** The bytes from `offset` on (of those in so far), as Buffers sharing this chunk's memory. */
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

  #next(): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure)
    return new Promise<void>((resolve) => this.#waiters.push(resolve))
  }

  #wake(): void {
    const waiters = this.#waiters
    this.#waiters = []
    for (const w of waiters) w()
  }
}
