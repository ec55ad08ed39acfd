import { execFileSync } from 'node:child_process'
import { createWriteStream } from 'node:fs'
import { mkdir, mkdtemp, readFile, readdir, rm, symlink, utimes, writeFile, appendFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { describe, expect, it, onTestFinished } from 'vitest'
import { openTarIndex, writeTar, writeTarFile, type TarWriteEntry } from './tar.js'

async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'blobcache-tar-'))
  onTestFinished(() => rm(d, { recursive: true, force: true }))
  return d
}

const tar = (args: string[], cwd?: string) => execFileSync('tar', args, { cwd, encoding: 'utf8' })

const fileEntry = (path: string, data: Buffer | string, extra: Partial<TarWriteEntry> = {}): TarWriteEntry => {
  const buf = Buffer.from(data)
  return { path, size: buf.length, open: () => Readable.from([buf]), ...extra } as TarWriteEntry
}

/** Builds one raw ustar header block, as a hostile archive author would. */
function rawHeader(name: string, opts: { type?: string; size?: number | Buffer; linkname?: string; checksum?: 'bad' } = {}): Buffer {
  const h = Buffer.alloc(512)
  h.write(name, 0, 100, 'utf8')
  h.write('0000644\0', 100, 'latin1')
  h.write('0000000\0', 108, 'latin1')
  h.write('0000000\0', 116, 'latin1')
  if (Buffer.isBuffer(opts.size)) opts.size.copy(h, 124)
  else h.write((opts.size ?? 0).toString(8).padStart(11, '0') + '\0', 124, 'latin1')
  h.write('00000000000\0', 136, 'latin1')
  h.write(opts.type ?? '0', 156, 'latin1')
  h.write(opts.linkname ?? '', 157, 100, 'utf8')
  h.write('ustar\x0000', 257, 'latin1')
  h.fill(0x20, 148, 156)
  let sum = 0
  for (const b of h) sum += b
  if (opts.checksum === 'bad') sum += 1
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1')
  return h
}

const pad = (n: number) => Buffer.alloc((512 - (n % 512)) % 512)
const rawFile = (name: string, data: string) => [rawHeader(name, { size: data.length }), Buffer.from(data), pad(data.length)]
const end = Buffer.alloc(1024)

async function writeRaw(dir: string, blocks: Buffer[]): Promise<string> {
  const f = join(dir, 'raw.tar')
  await writeFile(f, Buffer.concat(blocks))
  return f
}

describe('writeTar', () => {
  it('writes archives GNU tar lists and extracts byte for byte', async () => {
    const dir = await tempDir()
    const longName = `deep/${'d'.repeat(120)}/${'f'.repeat(90)}.bin`
    const big = Buffer.alloc(3 * (1 << 20) + 17, 7)
    const out = join(dir, 'out.tar')
    await writeTar(
      [
        { path: 'blobs', type: 'dir' },
        fileEntry('blobs/a.txt', 'hello\n'),
        fileEntry('empty', ''),
        fileEntry(longName, 'long'),
        fileEntry('ünïcödé.txt', 'utf8', { mtime: 1_700_000_000 }),
        { path: 'big.bin', size: big.length, open: async () => Readable.from([big.subarray(0, 5), big.subarray(5)]) },
        { path: 'link', type: 'symlink', linkname: 'blobs/a.txt' },
      ],
      createWriteStream(out),
    )
    const listing = tar(['-tvf', out])
    expect(listing).toContain('ünïcödé.txt')
    expect(listing).toMatch(/0\/0 .* 1970-01-01 00:00 blobs\/a\.txt/)
    const x = join(dir, 'x')
    await mkdir(x)
    tar(['-xf', out, '-C', x])
    expect(await readFile(join(x, 'blobs/a.txt'), 'utf8')).toBe('hello\n')
    expect(await readFile(join(x, longName), 'utf8')).toBe('long')
    expect(await readFile(join(x, 'ünïcödé.txt'), 'utf8')).toBe('utf8')
    expect((await readFile(join(x, 'big.bin'))).equals(big)).toBe(true)
    expect(await readFile(join(x, 'link'), 'utf8')).toBe('hello\n')
    expect((await readFile(out)).length % 512).toBe(0)
  })

  it('is deterministic and readable by openTarIndex', async () => {
    const dir = await tempDir()
    const entries = () => [fileEntry('a', 'x'), { path: 'd/', type: 'dir' as const }, fileEntry(`${'n'.repeat(150)}`, 'y')]
    await writeTar(entries(), createWriteStream(join(dir, '1.tar')))
    await writeTar(entries(), createWriteStream(join(dir, '2.tar')))
    expect((await readFile(join(dir, '1.tar'))).equals(await readFile(join(dir, '2.tar')))).toBe(true)
    const ix = await openTarIndex(join(dir, '1.tar'))
    expect([...ix.entries.keys()]).toEqual(['a', 'd/', 'n'.repeat(150)])
    expect((await ix.readFile('n'.repeat(150))).toString()).toBe('y')
  })

  it('fails SIZE_INVALID when a stream yields fewer or more bytes than declared', async () => {
    const dir = await tempDir()
    const short: TarWriteEntry = { path: 'a', size: 10, open: () => Readable.from([Buffer.from('abc')]) }
    await expect(writeTar([short], createWriteStream(join(dir, 's.tar')))).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    const long: TarWriteEntry = { path: 'a', size: 2, open: () => Readable.from([Buffer.from('abc')]) }
    await expect(writeTar([long], createWriteStream(join(dir, 'l.tar')))).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    await expect(writeTar([fileEntry('../x', 'a')], createWriteStream(join(dir, 'e.tar')))).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
  })

  it('rejects with the abort reason and accepts async iterables', async () => {
    const dir = await tempDir()
    const ac = new AbortController()
    async function* gen(): AsyncGenerator<TarWriteEntry> {
      yield fileEntry('a', 'a')
      ac.abort(new Error('stop'))
      yield fileEntry('b', 'b')
    }
    await expect(writeTar(gen(), createWriteStream(join(dir, 'a.tar')), { signal: ac.signal })).rejects.toThrow('stop')
  })
})

describe('writeTarFile', () => {
  // several MiB, so that the file is flushed to disk in the background while it is written
  const layer = Buffer.alloc(20 << 20, 3)
  layer.write('a layer', 5 << 20)
  const entries = (): TarWriteEntry[] => [fileEntry('oci-layout', '{}'), { path: 'blobs', type: 'dir' }, fileEntry('blobs/layer', layer)]

  // with direct writes where the file system has them, and through the page cache
  const settings = [undefined, '0']
  async function withDirectIo<T>(setting: string | undefined, run: () => Promise<T>): Promise<T> {
    const before = process.env.BLOBCACHE_DIRECT_IO
    if (setting === undefined) delete process.env.BLOBCACHE_DIRECT_IO
    else process.env.BLOBCACHE_DIRECT_IO = setting
    try {
      return await run()
    } finally {
      if (before === undefined) delete process.env.BLOBCACHE_DIRECT_IO
      else process.env.BLOBCACHE_DIRECT_IO = before
    }
  }

  it.each(settings)('writes the same bytes as writeTar, replaces the file there, and leaves no temporary file (BLOBCACHE_DIRECT_IO=%s)', async (setting) => {
    const dir = await tempDir()
    const target = join(dir, 'image.tar')
    await writeFile(target, 'an older archive')
    await withDirectIo(setting, () => writeTarFile(target, entries()))
    await new Promise<void>((resolve, reject) => {
      writeTar(entries(), createWriteStream(join(dir, 'stream.tar'))).then(resolve, reject)
    })
    const [got, want] = await Promise.all([readFile(target), readFile(join(dir, 'stream.tar'))])
    expect(got.equals(want)).toBe(true)
    expect(tar(['-tvf', target], dir)).toContain(` ${layer.length} `)
    expect((await readdir(dir)).sort()).toEqual(['image.tar', 'stream.tar'])
  })

  it.each(settings)('an entry of the wrong size, or an abort midway, leaves the old file and no temporary file (BLOBCACHE_DIRECT_IO=%s)', async (setting) => {
    const dir = await tempDir()
    const target = join(dir, 'image.tar')
    await writeFile(target, 'an older archive')
    const short = fileEntry('blobs/layer', layer, { size: layer.length + 1 })
    await expect(withDirectIo(setting, () => writeTarFile(target, [fileEntry('a', 'b'), short]))).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    const ac = new AbortController()
    async function* slow(): AsyncGenerator<TarWriteEntry> {
      yield fileEntry('blobs/layer', layer)
      ac.abort(new Error('stop'))
      yield fileEntry('more', 'x')
    }
    await expect(withDirectIo(setting, () => writeTarFile(target, slow(), { signal: ac.signal }))).rejects.toThrow('stop')
    expect(await readFile(target, 'utf8')).toBe('an older archive')
    expect(await readdir(dir)).toEqual(['image.tar'])
  })
})

describe('openTarIndex on archives made by GNU tar', () => {
  it.each(['gnu', 'posix', 'ustar'])('indexes --format=%s with long names, dirs and links', async (format) => {
    const dir = await tempDir()
    const src = join(dir, 'src')
    const longDir = format === 'ustar' ? 'p'.repeat(60) : 'p'.repeat(130)
    await mkdir(join(src, 'blobs/sha256'), { recursive: true })
    await mkdir(join(src, longDir), { recursive: true })
    await writeFile(join(src, 'blobs/sha256/aaa'), 'blob-a')
    await writeFile(join(src, longDir, 'q'.repeat(80)), 'long one')
    await writeFile(join(src, 'index.json'), '{}')
    await symlink('blobs/sha256/aaa', join(src, 'sym'))
    await utimes(join(src, 'index.json'), 1_600_000_000, 1_600_000_000)
    const file = join(dir, 'a.tar')
    tar(['-cf', file, `--format=${format}`, '-C', src, '.'])
    tar(['-rf', file, `--format=${format}`, '-C', src, 'index.json', '--hard-dereference'])
    const ix = await openTarIndex(file)
    expect(ix.has('blobs')).toBe(true)
    expect(ix.entries.get('blobs/sha256/')?.type).toBe('dir')
    expect(ix.entries.get('blobs/sha256/aaa')).toMatchObject({ type: 'file', size: 6 })
    expect(ix.entries.get('index.json')?.mtime).toBe(1_600_000_000)
    expect((await ix.readFile(`${longDir}/${'q'.repeat(80)}`)).toString()).toBe('long one')
    expect(ix.entries.get('sym')).toMatchObject({ type: 'symlink', linkname: 'blobs/sha256/aaa' })
    expect((await ix.readFile('./sym')).toString()).toBe('blob-a')
    expect((await ix.readFile('blobs//sha256/./aaa')).toString()).toBe('blob-a')
  })

  it('follows hardlinks and symlinked parent directories inside the archive', async () => {
    const dir = await tempDir()
    const src = join(dir, 'src')
    await mkdir(join(src, 'real/sub'), { recursive: true })
    await writeFile(join(src, 'real/sub/f'), 'data')
    execFileSync('ln', [join(src, 'real/sub/f'), join(src, 'hard')])
    await symlink('real', join(src, 'alias'))
    const file = join(dir, 'a.tar')
    tar(['-cf', file, '-C', src, 'real', 'hard', 'alias'])
    const ix = await openTarIndex(file)
    expect(ix.entries.get('hard')).toMatchObject({ type: 'hardlink', linkname: 'real/sub/f' })
    expect((await ix.readFile('hard')).toString()).toBe('data')
    expect((await ix.readFile('alias/sub/f')).toString()).toBe('data')
    expect(ix.resolve('alias/nothing')).toBeUndefined()
  })
})

describe('openTarIndex on hostile archives', () => {
  it.each([
    ['a ".." entry', () => rawFile('../evil', 'x')],
    ['a nested ".." entry', () => rawFile('a/../../evil', 'x')],
    ['an absolute path', () => rawFile('/etc/x', 'x')],
    ['a bad checksum', () => [rawHeader('a', { checksum: 'bad' })]],
    ['truncated data', () => [rawHeader('a', { size: 4096 }), Buffer.alloc(100)]],
    ['a huge base-256 size', () => [rawHeader('a', { size: Buffer.from([0x80, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]) })]],
    ['a negative base-256 size', () => [rawHeader('a', { size: Buffer.alloc(12, 0xff) })]],
    ['a partial header', () => [...rawFile('a', 'x'), Buffer.alloc(100, 1)]],
    ['a malformed pax record', () => [rawHeader('p', { type: 'x', size: 6 }), Buffer.from('9 a=b\n'), pad(6), ...rawFile('a', 'x')]],
  ])('rejects %s with ARCHIVE_INVALID', async (_name, blocks) => {
    const file = await writeRaw(await tempDir(), [...blocks(), end])
    await expect(openTarIndex(file)).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
  })

  it('keeps escaping links in the index but refuses to follow them', async () => {
    const file = await writeRaw(await tempDir(), [
      rawHeader('manifest.json', { type: '2', linkname: '../../outside' }),
      rawHeader('abs', { type: '2', linkname: '/etc/passwd' }),
      rawHeader('dir/up', { type: '2', linkname: '../../x' }),
      rawHeader('hard', { type: '1', linkname: '../x' }),
      rawHeader('loop1', { type: '2', linkname: 'loop2' }),
      rawHeader('loop2', { type: '2', linkname: 'loop1' }),
      rawHeader('parent', { type: '2', linkname: '..' }),
      ...rawFile('ok', 'fine'),
      end,
    ])
    const ix = await openTarIndex(file)
    expect(ix.entries.get('manifest.json')).toMatchObject({ type: 'symlink', linkname: '../../outside' })
    for (const p of ['manifest.json', 'abs', 'dir/up', 'hard', 'loop1', 'parent/ok']) {
      expect(() => ix.open(p), p).toThrow(expect.objectContaining({ code: 'ARCHIVE_INVALID' }))
    }
    await expect(ix.readFile('manifest.json')).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    expect(() => ix.open('../ok')).toThrow(expect.objectContaining({ code: 'ARCHIVE_INVALID' }))
    expect((await ix.readFile('ok')).toString()).toBe('fine')
  })

  it('reads base-256 sizes, pax and GNU long names, and lets the last duplicate win', async () => {
    const long = 'l'.repeat(200)
    const paxData = Buffer.from(`${long.length + 10} path=${long}\n`)
    const file = await writeRaw(await tempDir(), [
      rawHeader('g', { type: 'g', size: 10 }), Buffer.from('10 a=bcd\n\n'), pad(10),
      rawHeader('p', { type: 'x', size: paxData.length }), paxData, pad(paxData.length), ...rawFile('short', 'pax'),
      rawHeader('././@LongLink', { type: 'L', size: 301 }), Buffer.from('L'.repeat(300) + '\0'), pad(301), ...rawFile('x', 'gnu'),
      rawHeader('b256', { size: Buffer.from([0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]) }), Buffer.from('abc'), pad(3),
      ...rawFile('dup', 'first'),
      ...rawFile('dup', 'second'),
      end,
    ])
    const ix = await openTarIndex(file)
    expect([...ix.entries.keys()]).toEqual([long, 'L'.repeat(300), 'b256', 'dup'])
    expect((await ix.readFile(long)).toString()).toBe('pax')
    expect((await ix.readFile('L'.repeat(300))).toString()).toBe('gnu')
    expect((await ix.readFile('b256')).toString()).toBe('abc')
    expect((await ix.readFile('dup')).toString()).toBe('second')
  })

  it('finds entries whose parent directories have no entry, and reads byte ranges', async () => {
    const dir = await tempDir()
    const file = await writeRaw(dir, [
      ...rawFile('a/b/c.txt', '0123456789'),
      rawHeader('a/link', { type: '2', linkname: 'b' }),
      end,
    ])
    const ix = await openTarIndex(file)
    expect(ix.has('a/b/c.txt')).toBe(true)
    expect(ix.has('a/b')).toBe(false)
    expect(ix.resolve('a/link/c.txt')).toMatchObject({ path: 'a/b/c.txt', size: 10 })
    const range = async (start: number, length?: number) => Buffer.concat(await ix.open('a/link/c.txt', { start, length }).toArray()).toString()
    expect(await range(2, 3)).toBe('234')
    expect(await range(7)).toBe('789')
    expect(await range(10, 0)).toBe('')
    expect(() => ix.open('a/b/c.txt', { start: 8, length: 5 })).toThrow(expect.objectContaining({ code: 'SIZE_INVALID' }))
    expect(ix.identity).toMatch(/^\d+:\d+:\d+:/)
  })

  it('reports missing entries with the caller\'s code and enforces readFile limits', async () => {
    const dir = await tempDir()
    const file = await writeRaw(dir, [...rawFile('a', 'abcdef'), rawHeader('d/', { type: '5' }), end])
    const ix = await openTarIndex(file)
    expect(() => ix.open('nope', { notFoundCode: 'BLOB_UNKNOWN' })).toThrow(expect.objectContaining({ code: 'BLOB_UNKNOWN' }))
    expect(() => ix.open('nope')).toThrow(expect.objectContaining({ code: 'ARCHIVE_INVALID' }))
    expect(() => ix.open('d')).toThrow(expect.objectContaining({ code: 'ARCHIVE_INVALID' }))
    await expect(ix.readFile('a', { maxBytes: 3 })).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    await appendFile(file, Buffer.alloc(512))
    const stream = ix.open('a')
    await expect(Readable.from(stream).toArray()).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
  })
})
