// Builds small uncompressed tar layers in memory for tests: a minimal ustar writer, so that
// fixtures never depend on the tar code under test.

/** One entry of a test layer: a regular file, or a directory when `type` is 'dir'. */
export interface LayerFile {
  /** Path inside the layer, without a leading slash; at most 100 bytes (no long-name headers). */
  name: string
  /** File content; ignored for directories. Default empty. */
  content?: Buffer | string
  /** Permission bits. Default 0o644 for files, 0o755 for directories. */
  mode?: number
  /** Modification time in seconds. Default 0, so that layers are reproducible. */
  mtime?: number
  /** Entry type. Default 'file'. */
  type?: 'file' | 'dir'
}

function octal(n: number, width: number): string {
  return n.toString(8).padStart(width - 1, '0') + '\0'
}

function header(name: string, size: number, mode: number, mtime: number, typeflag: string): Buffer {
  const h = Buffer.alloc(512)
  if (Buffer.byteLength(name) > 100) throw new Error(`makeLayer: name longer than 100 bytes: ${name}`)
  h.write(name, 0, 100, 'utf8')
  h.write(octal(mode, 8), 100, 'ascii')
  h.write(octal(0, 8), 108, 'ascii') // uid
  h.write(octal(0, 8), 116, 'ascii') // gid
  h.write(octal(size, 12), 124, 'ascii')
  h.write(octal(mtime, 12), 136, 'ascii')
  h.write('        ', 148, 'ascii') // checksum placeholder: eight spaces
  h.write(typeflag, 156, 'ascii')
  h.write('ustar\0' + '00', 257, 'ascii')
  h.write('root', 265, 'ascii')
  h.write('root', 297, 'ascii')
  let sum = 0
  for (const byte of h) sum += byte
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'ascii')
  return h
}

/** Returns an uncompressed ustar archive holding `files` in order, ended by two zero blocks. */
export function makeLayer(files: LayerFile[]): Buffer {
  const parts: Buffer[] = []
  for (const f of files) {
    if (f.type === 'dir') {
      const name = f.name.endsWith('/') ? f.name : `${f.name}/`
      parts.push(header(name, 0, f.mode ?? 0o755, f.mtime ?? 0, '5'))
      continue
    }
    const body = Buffer.isBuffer(f.content) ? f.content : Buffer.from(f.content ?? '')
    parts.push(header(f.name, body.length, f.mode ?? 0o644, f.mtime ?? 0, '0'), body)
    const pad = (512 - (body.length % 512)) % 512
    if (pad) parts.push(Buffer.alloc(pad))
  }
  parts.push(Buffer.alloc(1024))
  return Buffer.concat(parts)
}
