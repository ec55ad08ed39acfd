import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it, onTestFinished } from 'vitest'
import { parseNormalizedNamed } from '../name.js'
import { type RegistriesConf, loadRegistriesConf, matchLength, pullSources } from './registries-conf.js'
import { parseToml } from './toml.js'

async function temp(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'blobcache-regconf-'))
  onTestFinished(() => rm(d, { recursive: true, force: true }))
  return d
}

const CONF = `
# a comment
unqualified-search-registries = ["example.com", 'quay.io',
  "docker.io", ]   # trailing comma, several lines

[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal.example.net/bar"   # remapped

[[registry.mirror]]
location = "mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "mirror-1.local:5000/mirrors/foo"
insecure = true
pull-from-mirror = "digest-only"

[[registry]]
location = "example.com"
mirror-by-digest-only = true
[[registry.mirror]]
location = "all-of-example.local"

[[registry]]
prefix = "*.blocked.test"
blocked = true

[[registry]]
prefix = "tagged.test/app:v1"
location = "other.test/app:v1"

[aliases]
"fedora" = "registry.fedoraproject.org/fedora"
`

describe('parseToml', () => {
  it('reads the tables, arrays of tables, strings, booleans and arrays registries.conf uses', () => {
    const doc = parseToml(CONF, 'r.conf')
    expect(doc['unqualified-search-registries']).toEqual(['example.com', 'quay.io', 'docker.io'])
    const registries = doc.registry as Record<string, unknown>[]
    expect(registries).toHaveLength(4)
    expect(registries[0]).toMatchObject({ prefix: 'example.com/foo', location: 'internal.example.net/bar', insecure: false })
    expect((registries[0].mirror as unknown[]).length).toBe(2)
    expect((registries[1].mirror as unknown[]).length).toBe(1)
    expect(doc.aliases).toEqual({ fedora: 'registry.fedoraproject.org/fedora' })
    expect(parseToml('a.b = "x\\ty\\u00e9"\nn = 1_000', 'f')).toEqual({ a: { b: 'x\tyé' }, n: 1000 })
  })

  it('refuses what it does not understand, naming the file and line (REGISTRIES_CONF_INVALID)', () => {
    const cases: [string, RegExp][] = [
      ['a = """x"""', /f:1: multi-line strings/],
      ['\n\na = {x = 1}', /f:3: inline tables/],
      ['a = 1\na = 2', /f:2: a is defined twice/],
      ['a = "open', /unterminated string/],
      ['a = 1.5', /unsupported value/],
      ['[a\nb = 1', /"\]" expected/],
      ['a = 1 b', /unexpected/],
      ['= 1', /a key was expected/],
    ]
    for (const [text, message] of cases) {
      expect(() => parseToml(text, 'f'), text).toThrow(expect.objectContaining({ code: 'REGISTRIES_CONF_INVALID', message: expect.stringMatching(message) }))
    }
  })
})

describe('registries.conf', () => {
  const load = async (text: string): Promise<RegistriesConf> => {
    const dir = await temp()
    await writeFile(join(dir, 'registries.conf'), text)
    return loadRegistriesConf({ path: join(dir, 'registries.conf') })
  }
  const sources = (conf: RegistriesConf, name: string) => pullSources(conf, parseNormalizedNamed(name)).map((s) => `${s.named.toString()}${s.insecure ? ' (insecure)' : ''}${s.mirror ? ' [mirror]' : ''}`)
  const digest = `sha256:${'a'.repeat(64)}`

  it('matches prefixes at separators, the longest first, *.domain on the host', () => {
    expect(matchLength('example.com/foo/app:v1', 'example.com/foo')).toBe('example.com/foo'.length)
    expect(matchLength('example.com/foobar/app:v1', 'example.com/foo')).toBe(-1)
    expect(matchLength('example.com:5000/app:v1', 'example.com')).toBe('example.com'.length) // as containers/image (documented as not to rely on)
    expect(matchLength('a.b.blocked.test/x:1', '*.blocked.test')).toBe('a.b.blocked.test'.length)
    expect(matchLength('blocked.test/x:1', '*.blocked.test')).toBe(-1)
  })

  it('tries the mirrors that apply, then the remapped primary location', async () => {
    const conf = await load(CONF)
    expect(sources(conf, 'example.com/foo/image:latest')).toEqual([
      'mirror-0.local/mirror-for-foo/image:latest [mirror]',
      'internal.example.net/bar/image:latest',
    ])
    expect(sources(conf, `example.com/foo/image@${digest}`)).toEqual([
      `mirror-0.local/mirror-for-foo/image@${digest} [mirror]`,
      `mirror-1.local:5000/mirrors/foo/image@${digest} (insecure) [mirror]`,
      `internal.example.net/bar/image@${digest}`,
    ])
    // mirror-by-digest-only: a tag reads the primary only
    expect(sources(conf, 'example.com/other:1')).toEqual(['example.com/other:1'])
    expect(sources(conf, `example.com/other@${digest}`)).toEqual([`all-of-example.local/other@${digest} [mirror]`, `example.com/other@${digest}`])
    // a prefix with a tag; no entry at all
    expect(sources(conf, 'tagged.test/app:v1')).toEqual(['other.test/app:v1'])
    expect(sources(conf, 'tagged.test/app:v2')).toEqual(['tagged.test/app:v2'])
    expect(sources(conf, 'alpine:latest')).toEqual(['docker.io/library/alpine:latest'])
  })

  it('refuses a blocked namespace (REGISTRY_BLOCKED), and reads the version 1 lists', async () => {
    const conf = await load(CONF)
    expect(() => sources(conf, 'x.blocked.test/app:1')).toThrow(expect.objectContaining({ code: 'REGISTRY_BLOCKED' }))
    const v1 = await load(`[registries.search]\nregistries = ['a.test']\n[registries.insecure]\nregistries = ['plain.test:5000']\n[registries.block]\nregistries = ['bad.test']\n`)
    expect(sources(v1, 'plain.test:5000/app:1')).toEqual(['plain.test:5000/app:1 (insecure)'])
    expect(() => sources(v1, 'bad.test/app:1')).toThrow(expect.objectContaining({ code: 'REGISTRY_BLOCKED' }))
  })

  it('finds the usual files and drop-ins (a later prefix replaces an earlier one); an explicit file must exist', async () => {
    const root = await temp()
    const system = join(root, 'etc')
    const home = join(root, 'home')
    await mkdir(join(system, 'registries.conf.d'), { recursive: true })
    await writeFile(join(system, 'registries.conf'), '[[registry]]\nprefix = "a.test"\nlocation = "system.test"\n')
    await writeFile(join(system, 'registries.conf.d', '10-x.conf'), '[[registry]]\nprefix = "b.test"\nlocation = "b.test"\nblocked = true\n')
    const opts = { env: { HOME: home }, systemDir: system }
    let conf = await loadRegistriesConf(opts)
    expect(sources(conf, 'a.test/x:1')).toEqual(['system.test/x:1'])
    expect(() => sources(conf, 'b.test/x:1')).toThrow(expect.objectContaining({ code: 'REGISTRY_BLOCKED' }))
    // the user's registries.conf replaces the system one; the user's drop-ins come last
    await mkdir(join(home, '.config', 'containers', 'registries.conf.d'), { recursive: true })
    await writeFile(join(home, '.config', 'containers', 'registries.conf'), '[[registry]]\nprefix = "a.test"\nlocation = "user.test"\n')
    await writeFile(join(home, '.config', 'containers', 'registries.conf.d', '20-y.conf'), '[[registry]]\nprefix = "b.test"\nlocation = "b.test"\nblocked = false\n')
    conf = await loadRegistriesConf(opts)
    expect(sources(conf, 'a.test/x:1')).toEqual(['user.test/x:1'])
    expect(sources(conf, 'b.test/x:1')).toEqual(['b.test/x:1'])
    // CONTAINERS_REGISTRIES_CONF, alone
    const only = join(root, 'only.conf')
    await writeFile(only, '[[registry]]\nprefix = "a.test"\nlocation = "env.test"\n')
    conf = await loadRegistriesConf({ ...opts, env: { HOME: home, CONTAINERS_REGISTRIES_CONF: only } })
    expect(conf.files).toEqual([only])
    expect(sources(conf, 'a.test/x:1')).toEqual(['env.test/x:1'])
    await expect(loadRegistriesConf({ path: join(root, 'missing.conf') })).rejects.toMatchObject({ code: 'REGISTRIES_CONF_INVALID' })
    await expect(load('[[registry]]\nprefix = "*.w.test"\nlocation = "x.test"\n')).rejects.toMatchObject({ code: 'REGISTRIES_CONF_INVALID', message: expect.stringContaining('wildcard') })
    await expect(load('[[registry]]\nprefix = "a.test"\n')).rejects.toMatchObject({ code: 'REGISTRIES_CONF_INVALID', message: expect.stringContaining('no location') })
    await expect(load('[[registry]]\nprefix = "a.test"\nlocation = "a.test"\n[[registry.mirror]]\npull-from-mirror = "sometimes"\nlocation = "m.test"\n')).rejects.toMatchObject({
      code: 'REGISTRIES_CONF_INVALID',
    })
  })
})
