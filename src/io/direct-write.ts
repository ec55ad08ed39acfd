// Large files written front to back bypass the page cache: their bytes are staged in aligned
// memory and written with O_DIRECT through a second descriptor of the same open file. A
// buffered write first copies every byte into page-cache pages the kernel has to find and fill
// (on a VM that hands free memory back to its host, each fresh page is a fault on the host:
// 0.5 to 0.9 GB/s here, against 1.8 GB/s direct), and a file that is fsynced afterwards is then
// copied a second time, to the disk. Direct writes go to the disk once, from memory that is
// reused. Where O_DIRECT cannot be had (no /proc, a file system without it such as an older
// tmpfs, WebAssembly disabled for the aligned memory), or fails, the same bytes go through the
// plain descriptor instead, so the caller never sees the difference.
import { constants } from 'node:fs'
import { type FileHandle, open, statfs } from 'node:fs/promises'
import debug from 'debug'

const log = debug('blobcache:io:direct-write')

/** Alignment of every direct write's memory, offset and length (a page: enough for 512 and 4096 byte sectors). */
export const DIRECT_ALIGN = 4096
/** Bytes of one staged write. */
export const STAGE_BYTES = 1 << 20
/** Stages carved from one WebAssembly memory (whose buffer is page-aligned). */
const STAGES_PER_MEMORY = 4
/** Free stages kept for reuse. */
const STAGES_KEPT = 8

type WasmMemory = new (d: { initial: number }) => { buffer: ArrayBuffer }

/**
 * WebAssembly's Memory (typed here: the project's libs leave WebAssembly out), looked up when
 * used: absent when disabled (--jitless), and absent too while the CLI's startup snapshot is
 * built, which runs this module's top level.
 */
function wasmMemory(): WasmMemory | undefined {
  return (globalThis as { WebAssembly?: { Memory: WasmMemory } }).WebAssembly?.Memory
}

/**
 * File systems whose direct writes are synchronous trips to a server (or a userspace daemon), by
 * statfs magic number: there the page cache, which batches and writes behind, stays in use.
 */
const REMOTE_FILE_SYSTEMS = new Map<number, string>([
  [0x6969, 'nfs'],
  [0xff534d42, 'cifs'],
  [0xfe534d42, 'smb2'],
  [0x65735546, 'fuse'],
  [0x01021997, '9p'],
  [0x00c36400, 'ceph'],
  [0x0bd00bd0, 'lustre'],
  [0x47504653, 'gpfs'],
])

/** The statfs magic numbers of {@link REMOTE_FILE_SYSTEMS} (for the decompression thread's script). */
export const REMOTE_FILE_SYSTEM_TYPES: readonly number[] = [...REMOTE_FILE_SYSTEMS.keys()]

/** The name of a file system (a statfs magic number) that direct writes are not used on, or undefined. */
export function remoteFileSystem(type: number): string | undefined {
  return REMOTE_FILE_SYSTEMS.get(type)
}

/** Per device: the remote file system it is, or null when direct writes may be used. */
const devices = new Map<number, string | null>()

/** Why direct writes cannot be had in this process, once that is known. */
let unavailable: string | undefined

/** Free stages, page-aligned views of WebAssembly memories. */
const freeStages: Buffer[] = []

function takeStage(): Buffer {
  const free = freeStages.pop()
  if (free) return free
  const Memory = wasmMemory()
  if (!Memory) throw new Error('no WebAssembly.Memory')
  const memory = new Memory({ initial: (STAGE_BYTES * STAGES_PER_MEMORY) / 65536 })
  for (let i = 1; i < STAGES_PER_MEMORY; i++) freeStages.push(Buffer.from(memory.buffer, i * STAGE_BYTES, STAGE_BYTES))
  return Buffer.from(memory.buffer, 0, STAGE_BYTES)
}

function giveStage(stage: Buffer): void {
  if (freeStages.length < STAGES_KEPT) freeStages.push(stage)
}

/** Options of {@link DirectWriter.open}. */
export interface DirectWriterOptions {
  /** Opens the second descriptor of the open file `fd` (default: `/proc/self/fd/<fd>` with O_DIRECT). */
  reopen?: (fd: number) => Promise<FileHandle>
}

/**
 * Writes a new file's bytes, given in order from offset 0, mostly with O_DIRECT. Bytes given
 * to {@link write} are copied (the chunk may be reused once it resolves); whole stages go to
 * the file, one write at a time while the next stage fills. {@link end} writes the rest
 * (padded to the alignment, then truncated to the exact size through the plain descriptor).
 * If a direct write fails, it and every later one go through the plain descriptor; if that
 * fails too, the writer has failed: {@link written} bytes are in the file and {@link unwritten}
 * holds the ones after them that it was given.
 */
export class DirectWriter {
  readonly #plain: FileHandle
  #direct: FileHandle | undefined
  /** The stage being filled, and the one being written (or a spare). */
  #stages: [Buffer, Buffer]
  #filled = 0
  /** Bytes in the file. */
  #written = 0
  #inFlight: Promise<void> | undefined
  /** Bytes of the stage in flight. */
  #inFlightBytes = 0
  #failed: unknown
  #closed = false

  private constructor(plain: FileHandle, direct: FileHandle) {
    this.#plain = plain
    this.#direct = direct
    this.#stages = [takeStage(), takeStage()]
  }

  /**
   * A writer for the empty file open as `plain` (which stays the caller's), or undefined when
   * direct writes cannot be had here; then the caller writes through `plain` as usual.
   * `BLOBCACHE_DIRECT_IO=0` makes it always undefined; with `BLOBCACHE_DIRECT_IO=1` it rejects
   * instead of resolving undefined (a check that they are used). `reopen` (for tests) replaces
   * opening the direct descriptor.
   */
  static async open(plain: FileHandle, opts: DirectWriterOptions = {}): Promise<DirectWriter | undefined> {
    const setting = process.env.BLOBCACHE_DIRECT_IO
    if (setting === '0' && !opts.reopen) return undefined
    const known = unavailable !== undefined && !opts.reopen
    const writer = known ? undefined : await DirectWriter.#open(plain, opts)
    if (!writer && setting === '1') {
      throw Object.assign(new Error(`no direct writes (BLOBCACHE_DIRECT_IO=1 asks for them): ${unavailable ?? 'see DEBUG=blobcache:io:*'}`), { code: 'ENOTSUP' })
    }
    return writer
  }

  static async #open(plain: FileHandle, opts: DirectWriterOptions): Promise<DirectWriter | undefined> {
    if (!wasmMemory() || (!constants.O_DIRECT && !opts.reopen)) {
      unavailable = 'no O_DIRECT or WebAssembly memory on this platform'
      log('direct writes unavailable: %s', unavailable)
      return undefined
    }
    if (!opts.reopen) {
      const remote = await remoteDevice(plain)
      if (remote) {
        log('no direct writes on %s', remote)
        return undefined
      }
    }
    let direct: FileHandle
    try {
      // the same open file, not whatever is at its path by now
      direct = opts.reopen ? await opts.reopen(plain.fd) : await open(`/proc/self/fd/${plain.fd}`, constants.O_WRONLY | constants.O_DIRECT)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      // no /proc (then for the whole process), or no O_DIRECT on this file system
      if (code === 'ENOENT' && !(await procMounted())) unavailable = 'no /proc'
      log('no direct descriptor: %s', code ?? (err as Error).message)
      return undefined
    }
    try {
      return new DirectWriter(plain, direct)
    } catch (err) {
      await direct.close().catch(() => {})
      unavailable = `no aligned memory: ${(err as Error).message}`
      log('direct writes unavailable: %s', unavailable)
      return undefined
    }
  }

  /** True while writes still go through the direct descriptor. */
  get direct(): boolean {
    return this.#direct !== undefined
  }

  /** Bytes in the file. */
  get written(): number {
    return this.#written
  }

  /** After a failure: the bytes given after the first {@link written}, in order. */
  unwritten(): Buffer[] {
    const [filling, other] = this.#stages
    const parts = this.#inFlightBytes > 0 ? [other.subarray(0, this.#inFlightBytes)] : []
    if (this.#filled > 0) parts.push(filling.subarray(0, this.#filled))
    return parts
  }

  /** Stages `chunk`; resolves once it is copied, rejects if writing a stage to the file failed. */
  async write(chunk: Buffer): Promise<void> {
    let offset = 0
    while (offset < chunk.length) {
      if (this.#failed !== undefined) throw this.#failed
      const n = chunk.copy(this.#stages[0], this.#filled, offset)
      this.#filled += n
      offset += n
      if (this.#filled === STAGE_BYTES) {
        await this.#settleInFlight()
        this.#startWrite()
      }
    }
  }

  /** Writes every staged byte and sets the file's size to the bytes given; rejects if that failed. */
  async end(): Promise<void> {
    await this.#settleInFlight()
    const tail = this.#filled
    if (tail === 0) return
    const stage = this.#stages[0]
    const padded = Math.ceil(tail / DIRECT_ALIGN) * DIRECT_ALIGN
    stage.fill(0, tail, padded)
    try {
      await this.#put(stage, padded, this.#written)
      await this.#plain.truncate(this.#written + tail)
    } catch (err) {
      this.#failed = err
      throw err
    }
    this.#written += tail
    this.#filled = 0
  }

  /** Waits for a write in flight and closes the direct descriptor; the stages go back to the pool unless failed. Never rejects. */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    await this.#inFlight?.catch(() => {})
    await this.#direct?.close().catch(() => {})
    this.#direct = undefined
    if (this.#failed === undefined) for (const stage of this.#stages) giveStage(stage)
  }

  async #settleInFlight(): Promise<void> {
    if (!this.#inFlight) return
    await this.#inFlight
    if (this.#failed !== undefined) throw this.#failed
  }

  #startWrite(): void {
    const [full, next] = this.#stages
    this.#stages = [next, full]
    const length = this.#filled
    const at = this.#written
    this.#filled = 0
    this.#inFlightBytes = length
    this.#inFlight = this.#put(full, length, at).then(
      () => {
        this.#written += length
        this.#inFlightBytes = 0
        this.#inFlight = undefined
      },
      (err: unknown) => {
        this.#failed = err
        this.#inFlight = undefined
      },
    )
  }

  /** Writes `length` bytes of `stage` at `at`: directly, else (and from then on) through the plain descriptor. */
  async #put(stage: Buffer, length: number, at: number): Promise<void> {
    let done = 0
    const direct = this.#direct
    if (direct) {
      try {
        done = (await direct.write(stage, 0, length, at)).bytesWritten
      } catch (err) {
        log('direct write failed (%s): writing through the page cache', (err as NodeJS.ErrnoException).code ?? (err as Error).message)
        this.#direct = undefined
        await direct.close().catch(() => {})
      }
    }
    while (done < length) {
      const { bytesWritten } = await this.#plain.write(stage, done, length - done, at + done)
      done += bytesWritten
    }
  }
}

/** The remote file system `handle`'s file is on (see REMOTE_FILE_SYSTEMS), or undefined; statfs once per device. */
async function remoteDevice(handle: FileHandle): Promise<string | undefined> {
  try {
    const { dev } = await handle.stat()
    let known = devices.get(dev)
    if (known === undefined) {
      const { type } = await statfs(`/proc/self/fd/${handle.fd}`)
      known = remoteFileSystem(type) ?? null
      devices.set(dev, known)
    }
    return known ?? undefined
  } catch {
    return undefined // then opening the direct descriptor decides
  }
}

async function procMounted(): Promise<boolean> {
  try {
    await (await open('/proc/self/stat', 'r')).close()
    return true
  } catch {
    return false
  }
}
