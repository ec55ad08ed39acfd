import { describe, expect, it } from 'vitest'
import { digestOf } from './digest.js'
import {
  isDigested,
  isTagged,
  nameOnly,
  parseNamed,
  parseNormalizedNamed,
  splitDockerDomain,
  withDefaultTag,
  withDigest,
  withTag,
} from './name.js'

const sha256 = digestOf('a')
const sha512 = digestOf('a', 'sha512')
const hex64 = sha256.slice('sha256:'.length)

interface Row {
  input: string
  domain: string
  path: string
  tag?: string
  digest?: string
  full: string
  familiar: string
}

const valid: Row[] = [
  { input: 'alpine', domain: 'docker.io', path: 'library/alpine', full: 'docker.io/library/alpine', familiar: 'alpine' },
  { input: 'alpine:3.19', domain: 'docker.io', path: 'library/alpine', tag: '3.19', full: 'docker.io/library/alpine:3.19', familiar: 'alpine:3.19' },
  { input: 'foo/bar', domain: 'docker.io', path: 'foo/bar', full: 'docker.io/foo/bar', familiar: 'foo/bar' },
  { input: 'a/b/c', domain: 'docker.io', path: 'a/b/c', full: 'docker.io/a/b/c', familiar: 'a/b/c' },
  { input: 'index.docker.io/foo/bar', domain: 'docker.io', path: 'foo/bar', full: 'docker.io/foo/bar', familiar: 'foo/bar' },
  { input: 'index.docker.io/alpine', domain: 'docker.io', path: 'library/alpine', full: 'docker.io/library/alpine', familiar: 'alpine' },
  { input: 'docker.io/alpine', domain: 'docker.io', path: 'library/alpine', full: 'docker.io/library/alpine', familiar: 'alpine' },
  { input: 'docker.io/library/alpine:latest', domain: 'docker.io', path: 'library/alpine', tag: 'latest', full: 'docker.io/library/alpine:latest', familiar: 'alpine:latest' },
  { input: 'docker.io/library/foo/bar', domain: 'docker.io', path: 'library/foo/bar', full: 'docker.io/library/foo/bar', familiar: 'library/foo/bar' },
  { input: 'localhost/x', domain: 'localhost', path: 'x', full: 'localhost/x', familiar: 'localhost/x' },
  { input: 'localhost:5000/x:1', domain: 'localhost:5000', path: 'x', tag: '1', full: 'localhost:5000/x:1', familiar: 'localhost:5000/x:1' },
  { input: 'reg.io/x', domain: 'reg.io', path: 'x', full: 'reg.io/x', familiar: 'reg.io/x' },
  { input: 'reg.io/team/app/web:v1', domain: 'reg.io', path: 'team/app/web', tag: 'v1', full: 'reg.io/team/app/web:v1', familiar: 'reg.io/team/app/web:v1' },
  { input: '127.0.0.1:5000/repo', domain: '127.0.0.1:5000', path: 'repo', full: '127.0.0.1:5000/repo', familiar: '127.0.0.1:5000/repo' },
  { input: '[::1]:5000/foo/bar:tag', domain: '[::1]:5000', path: 'foo/bar', tag: 'tag', full: '[::1]:5000/foo/bar:tag', familiar: '[::1]:5000/foo/bar:tag' },
  { input: '[2001:db8::1]/repo', domain: '[2001:db8::1]', path: 'repo', full: '[2001:db8::1]/repo', familiar: '[2001:db8::1]/repo' },
  // An uppercase first component is a domain, as in docker.
  { input: 'Foo/bar', domain: 'Foo', path: 'bar', full: 'Foo/bar', familiar: 'Foo/bar' },
  { input: 'My-Registry.example.COM/x', domain: 'My-Registry.example.COM', path: 'x', full: 'My-Registry.example.COM/x', familiar: 'My-Registry.example.COM/x' },
  // Without a slash, `host:port` is a name with a tag.
  { input: 'localhost:5000', domain: 'docker.io', path: 'library/localhost', tag: '5000', full: 'docker.io/library/localhost:5000', familiar: 'localhost:5000' },
  { input: 'foo_bar__qux-x--y/a-b.c_d', domain: 'docker.io', path: 'foo_bar__qux-x--y/a-b.c_d', full: 'docker.io/foo_bar__qux-x--y/a-b.c_d', familiar: 'foo_bar__qux-x--y/a-b.c_d' },
  { input: 'foo/bar:TAG_with.dots-1', domain: 'docker.io', path: 'foo/bar', tag: 'TAG_with.dots-1', full: 'docker.io/foo/bar:TAG_with.dots-1', familiar: 'foo/bar:TAG_with.dots-1' },
  { input: `alpine@${sha256}`, domain: 'docker.io', path: 'library/alpine', digest: sha256, full: `docker.io/library/alpine@${sha256}`, familiar: `alpine@${sha256}` },
  { input: `alpine:3@${sha256}`, domain: 'docker.io', path: 'library/alpine', tag: '3', digest: sha256, full: `docker.io/library/alpine:3@${sha256}`, familiar: `alpine:3@${sha256}` },
  { input: `reg.io:443/x@${sha512}`, domain: 'reg.io:443', path: 'x', digest: sha512, full: `reg.io:443/x@${sha512}`, familiar: `reg.io:443/x@${sha512}` },
  { input: `x:${'t'.repeat(128)}`, domain: 'docker.io', path: 'library/x', tag: 't'.repeat(128), full: `docker.io/library/x:${'t'.repeat(128)}`, familiar: `x:${'t'.repeat(128)}` },
  // 18 characters of `docker.io/library/` plus 237 is exactly 255.
  { input: 'a'.repeat(237), domain: 'docker.io', path: `library/${'a'.repeat(237)}`, full: `docker.io/library/${'a'.repeat(237)}`, familiar: 'a'.repeat(237) },
  { input: `reg.io/${'b'.repeat(248)}:t`, domain: 'reg.io', path: 'b'.repeat(248), tag: 't', full: `reg.io/${'b'.repeat(248)}:t`, familiar: `reg.io/${'b'.repeat(248)}:t` },
]

const invalid: [string, string, RegExp?][] = [
  ['empty', ''],
  ['a 64-hex identifier', hex64, /64-byte hexadecimal/],
  ['an uppercase name', 'ALPINE', /must be lowercase/],
  ['an uppercase path', 'foo/Bar', /must be lowercase/],
  ['an uppercase path on a registry', 'reg.io/Team/app:v1', /must be lowercase/],
  ['an uppercase path after docker.io', 'docker.io/Alpine', /must be lowercase/],
  ['an empty tag', 'alpine:'],
  ['an empty digest', 'alpine@'],
  ['only a tag', ':tag'],
  ['a tag starting with -', 'alpine:-tag', /invalid tag/],
  ['a tag starting with .', 'alpine:.tag', /invalid tag/],
  ['a tag with a slash', 'alpine:a/b'],
  ['a tag of 129 characters', `x:${'t'.repeat(129)}`, /invalid tag/],
  ['two tags', 'alpine:a:b', /invalid tag/],
  ['an empty path component', 'foo//bar'],
  ['a trailing slash', 'foo/bar/'],
  ['a path ending in a separator', 'foo-/bar'],
  ['a path starting with a separator', '_foo'],
  ['a path with three underscores', 'foo___bar'],
  ['a path with two dots', 'foo..bar'],
  ['a path with mixed separators', 'foo.-bar'],
  ['a space', 'alpine latest'],
  ['a short digest', 'alpine@sha256:abc'],
  ['an uppercase digest', `alpine@sha256:${hex64.toUpperCase()}`],
  ['a sha384 digest', `alpine@sha384:${'a'.repeat(96)}`],
  ['an md5 digest', `alpine@md5:${'a'.repeat(32)}`],
  ['a path-like digest', 'alpine@sha256:../../x'],
  ['two digests', `alpine@${sha256}@${sha256}`],
  ['a non-numeric port', 'localhost:port/x', /invalid domain/],
  ['an empty port', 'reg.io:/x', /invalid domain/],
  ['a domain starting with -', '-reg.io/x', /invalid domain/],
  ['a first component with . and _ (a domain, so _ is invalid)', 'foo_bar.baz/x', /invalid domain/],
  ['an unclosed IPv6 bracket', '[::1:5000/x', /invalid domain/],
  ['a name of 256 characters', 'a'.repeat(238), /255 characters/],
  ['a registry name of 256 characters', `reg.io/${'b'.repeat(249)}`, /255 characters/],
]

describe('parseNormalizedNamed', () => {
  it.each(valid.map((r) => [r.input, r] as const))('parses %s', (_input, row) => {
    const ref = parseNormalizedNamed(row.input)
    expect(ref.domain).toBe(row.domain)
    expect(ref.path).toBe(row.path)
    expect(ref.tag).toBe(row.tag)
    expect(ref.digest).toBe(row.digest)
    expect(ref.name()).toBe(`${row.domain}/${row.path}`)
    expect(ref.toString()).toBe(row.full)
    expect(`${ref}`).toBe(row.full)
    expect(JSON.stringify({ ref })).toBe(JSON.stringify({ ref: row.full }))
    expect(ref.familiar()).toBe(row.familiar)
  })

  it.each(valid.map((r) => [r.input, r] as const))('round-trips %s through toString and familiar', (_input, row) => {
    const ref = parseNormalizedNamed(row.input)
    expect(parseNormalizedNamed(ref.toString()).toString()).toBe(row.full)
    expect(parseNamed(ref.toString()).toString()).toBe(row.full)
    expect(parseNormalizedNamed(ref.familiar()).toString()).toBe(row.full)
  })

  it.each(invalid)('rejects %s', (_what, input, message) => {
    let err: unknown
    try {
      parseNormalizedNamed(input)
    } catch (e) {
      err = e
    }
    expect(err).toMatchObject({ code: 'REFERENCE_INVALID' })
    if (message) expect((err as Error).message).toMatch(message)
  })

  it('keeps the DIGEST_INVALID error as the cause of a bad digest', () => {
    expect(() => parseNormalizedNamed(`alpine@sha384:${'a'.repeat(96)}`)).toThrow(
      expect.objectContaining({ code: 'REFERENCE_INVALID', cause: expect.objectContaining({ code: 'DIGEST_INVALID' }) }),
    )
  })

  it('rejects non-strings', () => {
    expect(() => parseNormalizedNamed(undefined as never)).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
  })
})

describe('parseNamed', () => {
  it.each(['docker.io/library/alpine:3', 'localhost:5000/x', `reg.io/a/b@${sha256}`, 'docker.io/foo/bar'])('accepts canonical %s', (s) => {
    expect(parseNamed(s).toString()).toBe(s)
  })

  it.each(['alpine', 'alpine:3', 'foo/bar', 'docker.io/alpine', 'index.docker.io/library/alpine'])('rejects non-canonical %s', (s) => {
    expect(() => parseNamed(s)).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID', message: expect.stringMatching(/canonical/) }))
  })
})

describe('splitDockerDomain', () => {
  it.each([
    ['alpine', 'docker.io', 'library/alpine'],
    ['foo/bar', 'docker.io', 'foo/bar'],
    ['localhost/foo', 'localhost', 'foo'],
    ['local:5000/foo', 'local:5000', 'foo'],
    ['reg.io/foo', 'reg.io', 'foo'],
    ['UPPER/foo', 'UPPER', 'foo'],
    ['index.docker.io/foo', 'docker.io', 'library/foo'],
  ])('%s -> %s + %s', (s, domain, remainder) => {
    expect(splitDockerDomain(s)).toEqual({ domain, remainder })
  })
})

describe('tags and digests', () => {
  it('withDefaultTag adds latest only to a bare name', () => {
    expect(withDefaultTag(parseNormalizedNamed('alpine')).toString()).toBe('docker.io/library/alpine:latest')
    expect(withDefaultTag(parseNormalizedNamed('alpine')).familiar()).toBe('alpine:latest')
    expect(withDefaultTag(parseNormalizedNamed('alpine:3')).toString()).toBe('docker.io/library/alpine:3')
    expect(withDefaultTag(parseNormalizedNamed(`alpine@${sha256}`)).toString()).toBe(`docker.io/library/alpine@${sha256}`)
  })

  it('isTagged and isDigested', () => {
    const both = parseNormalizedNamed(`alpine:3@${sha256}`)
    expect([isTagged(both), isDigested(both)]).toEqual([true, true])
    const bare = parseNormalizedNamed('alpine')
    expect([isTagged(bare), isDigested(bare)]).toEqual([false, false])
    expect([isTagged(parseNormalizedNamed('alpine:3')), isDigested(parseNormalizedNamed(`alpine@${sha256}`))]).toEqual([true, true])
  })

  it('withTag, withDigest and nameOnly build new references', () => {
    const ref = parseNormalizedNamed(`reg.io/x:1@${sha256}`)
    expect(withTag(ref, '2').toString()).toBe(`reg.io/x:2@${sha256}`)
    expect(withDigest(ref, sha512).toString()).toBe(`reg.io/x:1@${sha512}`)
    expect(nameOnly(ref).toString()).toBe('reg.io/x')
    expect(ref.toString()).toBe(`reg.io/x:1@${sha256}`)
    expect(() => withTag(ref, 'bad tag')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => withDigest(ref, 'sha256:../../x' as never)).toThrow(expect.objectContaining({ code: 'DIGEST_INVALID' }))
  })
})
