// Runs the CLI in-process through main(argv, io) with captured output.
import { Writable } from 'node:stream'
import { type CliIO, main } from '../../src/cli/main.js'

/** A Writable that keeps what was written. */
export class Capture extends Writable {
  chunks: Buffer[] = []
  isTTY = false
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.chunks.push(Buffer.from(chunk))
    cb()
  }
  get bytes(): Buffer {
    return Buffer.concat(this.chunks)
  }
  get text(): string {
    return this.bytes.toString('utf8')
  }
}

export interface Run {
  code: number
  stdout: string
  stderr: string
  out: Capture
}

export async function cli(argv: string[], opts: { isTTY?: boolean } = {}): Promise<Run> {
  const out = new Capture()
  const err = new Capture()
  const io: CliIO = { stdout: out, stderr: err, isTTY: opts.isTTY ?? false, env: {} }
  const code = await main(argv, io)
  return { code, stdout: out.text, stderr: err.text, out }
}

