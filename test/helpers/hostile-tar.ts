// Hostile tar archives for the reliability tests: a raw writer that puts into the headers exactly
// what it is told (names with `..` or a leading `/`, link targets outside the archive, declared
// sizes that do not match the data, pax and GNU long-name records, bad checksums), and
// fast-check generators of such entries. Never built with the code under test.
import fc from 'fast-check'

/** One raw entry. */
export interface RawEntry {
  path: string
  /** '0' file, '1' hardlink, '2' symlink, '5' dir, '3'/'4'/'6' devices and fifos, '7' contiguous. Default '0'. */
  type?: '0' | '1' | '2' | '3' | '4' | '5' | '6' | '7'
  data?: Buffer
  linkname?: string
  /** Size written in the header instead of the data length (the data is written as given). */
  declaredSize?: number
  /** Put the path (and link) in a pax header instead of the ustar fields. */
  pax?: boolean
  /** Put the path in a GNU `L` long-name record. */
  gnuLong?: boolean
  /** Break the header checksum. */
  badChecksum?: boolean
  mode?: number
}

function field(h: Buffer, value: number, off: number, width: number): void {
  if (value > 8 ** (width - 1) - 1) {
    // base-256, as GNU tar writes big sizes
    h.fill(0, off, off + width)
    let v = BigInt(value)
    for (let i = off + width - 1; i > off; i--, v >>= 8n) h[i] = Number(v & 0xffn)
    h[off] = 0x80
  } else h.write(value.toString(8).padStart(width - 1, '0') + '\0', off, width, 'latin1')
}

function header(name: string, type: string, size: number, linkname = '', mode = 0o644, badChecksum = false): Buffer {
  const h = Buffer.alloc(512)
  h.write(name, 0, 100, 'utf8')
  field(h, mode, 100, 8)
  field(h, 0, 108, 8)
  field(h, 0, 116, 8)
  field(h, size, 124, 12)
  field(h, 0, 136, 12)
  h.write('        ', 148, 'latin1')
  h.write(type, 156, 'latin1')
  h.write(linkname, 157, 100, 'utf8')
  h.write('ustar\u000000', 257, 'latin1')
  let sum = 0
  for (const b of h) sum += b
  if (badChecksum) sum += 1
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1')
  return h
}

const pad = (n: number) => Buffer.alloc((512 - (n % 512)) % 512)

function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`
  let len = Buffer.byteLength(body) + 1
  while (Buffer.byteLength(body) + String(len).length !== len) len = Buffer.byteLength(body) + String(len).length
  return `${len}${body}`
}

/** The blocks of one entry (its headers, data and padding). */
export function entryBlocks(e: RawEntry): Buffer[] {
  const data = e.data ?? Buffer.alloc(0)
  const out: Buffer[] = []
  let name = e.path
  let link = e.linkname ?? ''
  if (e.pax) {
    const records = Buffer.from(paxRecord('path', e.path) + (e.linkname ? paxRecord('linkpath', e.linkname) : ''))
    out.push(header('PaxHeaders/x', 'x', records.length), records, pad(records.length))
    name = 'pax-name-placeholder'
    if (e.linkname) link = 'pax-link-placeholder'
  } else if (e.gnuLong) {
    const long = Buffer.from(e.path + '\0')
    out.push(header('././@LongLink', 'L', long.length), long, pad(long.length))
    name = e.path.slice(0, 99)
  }
  const size = e.declaredSize ?? data.length
  out.push(header(name, e.type ?? '0', size, link, e.mode ?? (e.type === '5' ? 0o755 : 0o644), e.badChecksum), data, pad(data.length))
  return out
}

/** A tar archive of `entries`, ended by two zero blocks unless `end` is false. */
export function rawTar(entries: RawEntry[], end = true): Buffer {
  return Buffer.concat([...entries.flatMap(entryBlocks), ...(end ? [Buffer.alloc(1024)] : [])])
}

// ---- generators --------------------------------------------------------------------------------

/** Path pieces an attacker would try. */
export const hostileNames = fc.constantFrom(
  '../escaped', '../../sentinel/pwned', '/abs/escaped', '/etc/passwd', './../x', 'a/../../x', 'a/./../../x', 'blobs/../../x',
  'blobs/sha256/../../../sentinel/pwned', '.', './', '', '..', 'a//b', 'a/b/', '\\..\\x', 'a/\0/b', '\u202e', 'con', 'index.json/',
)

/** Link targets that leave the archive, loop, or stay inside. */
export const hostileLinks = fc.constantFrom('/etc/passwd', '../outside', '../../../sentinel', '/', '..', '.', 'loop-a', 'loop-b', 'a', 'a/b', 'blobs/sha256', 'index.json', '')

/** A component-ish path: plain names, deep nesting, hostile pieces. */
export const pathArb = fc.oneof(
  { weight: 4, arbitrary: fc.array(fc.constantFrom('a', 'b', 'blobs', 'sha256', 'index.json', 'oci-layout', 'loop-a', 'loop-b'), { minLength: 1, maxLength: 4 }).map((p) => p.join('/')) },
  { weight: 3, arbitrary: hostileNames },
  { weight: 1, arbitrary: fc.integer({ min: 50, max: 2000 }).map((n) => 'd/'.repeat(n) + 'deep') },
  { weight: 1, arbitrary: fc.string({ maxLength: 30 }) },
)

/** `arb` one time in `every`, else undefined. */
export function sometimes<T>(arb: fc.Arbitrary<T>, every: number): fc.Arbitrary<T | undefined> {
  return fc.oneof({ weight: every - 1, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: arb })
}

/** One generated entry: any type, hostile names and links, sizes that may lie. */
export const rawEntryArb: fc.Arbitrary<RawEntry> = fc
  .record({
    path: pathArb,
    type: fc.constantFrom<NonNullable<RawEntry['type']>>('0', '0', '0', '1', '2', '5', '3', '6', '7'),
    data: fc.uint8Array({ maxLength: 1500 }).map((b) => Buffer.from(b)),
    linkname: fc.option(hostileLinks, { nil: undefined }),
    declaredSize: sometimes(fc.oneof(fc.nat(4096), fc.constantFrom(2 ** 33, 2 ** 40, Number.MAX_SAFE_INTEGER)), 6),
    pax: fc.boolean(),
    gnuLong: fc.boolean(),
    badChecksum: sometimes(fc.constant(true), 20),
  })
  .map((e) => {
    // long names need pax or GNU records; a name that fits may use either
    if (Buffer.byteLength(e.path) > 100 && !e.pax) e.gnuLong = true
    // only files carry data (unless the size lies anyway), so that headers stay aligned
    if (e.type !== '0' && e.type !== '7' && e.declaredSize === undefined) e.data = Buffer.alloc(0)
    return e
  })

/** The path a reader sees for an entry: ustar and GNU names end at the first NUL. */
export function effectivePath(e: RawEntry): string {
  return e.pax ? e.path : e.path.split('\0')[0]
}

/** True when a reader MUST refuse the entry's path: absolute, or a `..` component. */
export function escapes(e: RawEntry): boolean {
  const p = effectivePath(e)
  return p.startsWith('/') || p.split('/').includes('..')
}

/** The entries of a valid OCI archive: oci-layout, index.json, then each blob (by digest). */
export function ociArchiveEntries(blobs: Map<string, Buffer>, index: unknown): RawEntry[] {
  return [
    { path: 'oci-layout', data: Buffer.from(JSON.stringify({ imageLayoutVersion: '1.0.0' })) },
    { path: 'index.json', data: Buffer.from(JSON.stringify(index)) },
    { path: 'blobs/', type: '5' },
    { path: 'blobs/sha256/', type: '5' },
    ...[...blobs].map(([digest, data]) => ({ path: `blobs/sha256/${digest.slice(7)}`, data })),
  ]
}
