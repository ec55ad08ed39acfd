import { describe, expect, it } from 'vitest'
import { bypassed, proxyAuthorization, proxyConfig, proxyFor } from './proxy.js'

describe('proxyConfig', () => {
  it('reads upper case before lower case, takes a bare host:port as http://, and ignores HTTP_PROXY under CGI', () => {
    const c = proxyConfig({ HTTP_PROXY: 'proxy.example:3128', http_proxy: 'http://lower:1', https_proxy: 'https://secure.example:8443', no_proxy: '.internal' })
    expect(c.http?.href).toBe('http://proxy.example:3128/')
    expect(c.https?.href).toBe('https://secure.example:8443/')
    expect(c.noProxy).toBe('.internal')
    expect(proxyConfig({ http_proxy: 'http://lower:1' }).http?.host).toBe('lower:1')
    expect(proxyConfig({ HTTP_PROXY: 'http://p:1', REQUEST_METHOD: 'GET' }).http).toBeUndefined()
    expect(proxyConfig({}).http).toBeUndefined()
  })

  it('refuses schemes other than http and https (UNSUPPORTED)', () => {
    expect(() => proxyConfig({ HTTPS_PROXY: 'socks5://127.0.0.1:1080' })).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
  })
})

describe('proxyFor', () => {
  const config = proxyConfig({ HTTP_PROXY: 'http://p:3128', HTTPS_PROXY: 'http://s:3129', NO_PROXY: 'skip.example' })
  it('uses HTTPS_PROXY for https and HTTP_PROXY for http, never one for the other', () => {
    expect(proxyFor(new URL('https://r.example/v2/'), config)?.host).toBe('s:3129')
    expect(proxyFor(new URL('http://r.example/v2/'), config)?.host).toBe('p:3128')
    expect(proxyFor(new URL('https://r.example/v2/'), proxyConfig({ HTTP_PROXY: 'http://p:1' }))).toBeUndefined()
    expect(proxyFor(new URL('https://a.skip.example/'), config)).toBeUndefined()
  })
})

describe('bypassed (NO_PROXY)', () => {
  it('never proxies localhost or a loopback address', () => {
    for (const h of ['localhost', 'LOCALHOST', '127.0.0.1', '127.1.2.3', '[::1]', '[::ffff:127.0.0.1]']) expect(bypassed(h, '80', ''), h).toBe(true)
    expect(bypassed('128.0.0.1', '80', '')).toBe(false)
  })

  it('matches names, subdomains, ports, addresses and ranges as Go does', () => {
    const cases: [string, string, string, boolean][] = [
      ['example.com', '443', 'example.com', true],
      ['a.example.com', '443', 'example.com', true],
      ['notexample.com', '443', 'example.com', false],
      ['example.com', '443', '.example.com', false],
      ['a.example.com', '443', '.example.com', true],
      ['a.example.com', '443', '*.example.com', true],
      ['Example.COM', '443', 'example.com', true],
      ['example.com', '5000', 'example.com:5000', true],
      ['example.com', '443', 'example.com:5000', false],
      ['anything', '1', '*', true],
      ['anything', '1', ' foo , *', true],
      ['10.1.2.3', '80', '10.0.0.0/8', true],
      ['11.1.2.3', '80', '10.0.0.0/8', false],
      ['10.1.2.3', '80', '10.1.2.3', true],
      ['10.1.2.3', '80', '10.1.2.4', false],
      ['[2001:db8::5]', '443', '2001:db8::/32', true],
      ['[2001:db9::5]', '443', '2001:db8::/32', false],
      ['[2001:db8::5]', '443', '2001:db8:0::5', true],
      ['[2001:db8::5]', '5000', '[2001:db8::5]:5000', true],
      ['[2001:db8::5]', '443', '[2001:db8::5]:5000', false],
      ['example.com', '443', '', false],
      ['example.com', '443', ',,', false],
    ]
    for (const [host, port, noProxy, want] of cases) expect(bypassed(host, port, noProxy), `${host}:${port} with NO_PROXY=${noProxy}`).toBe(want)
  })
})

describe('proxyAuthorization', () => {
  it('is Basic of the decoded user information, or none', () => {
    expect(proxyAuthorization(new URL('http://squid:p%40ss%20word@p:3128'))).toBe(`Basic ${Buffer.from('squid:p@ss word').toString('base64')}`)
    expect(proxyAuthorization(new URL('http://p:3128'))).toBeUndefined()
  })
})
